"""dynpose-bench: argument errors are one line with exit 2; a tiny real run on the TinyPose engine dir writes the
JSON and the PNG. Speed figures are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dynpose import bench
from dynpose.cli.bench import main as bench_main
from dynpose.errors import DynPoseError
from dynpose.roles import Role


def one_line_error(args: list[str]) -> str:
    run = CliRunner().invoke(bench_main, args)
    assert run.exit_code == 2, run.output
    msg = run.stderr.strip()
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0,8"], ">= 1"),
        (["--fractions", "0,1.5"], "[0, 1]"),
        (["--fractions", "a"], "--fractions"),
        (["--route", "bogus:1"], "routing policy"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_arguments(tinypose_engine_dir: Path, extra: list[str], needle: str) -> None:
    assert needle in one_line_error(["--engine-dir", str(tinypose_engine_dir), *extra])


def test_missing_engine_dir_and_half_pipeline_args(tmp_path: Path, tinypose_engine_dir: Path, coco_dir: Path) -> None:
    assert "not a directory" in one_line_error(["--engine-dir", str(tmp_path / "nope"), "--batch", "1"])
    assert "go together" in one_line_error(["--engine-dir", str(tinypose_engine_dir), "--images", str(coco_dir)])
    msg = one_line_error(["--engine-dir", str(tinypose_engine_dir), "--backend", "torch", "--batch", "1"])
    assert "torch" in msg


def test_parsers() -> None:
    assert bench.parse_batches("8, 1,8") == [1, 8]
    assert bench.parse_fractions("1,0,0.5") == [0.0, 0.5, 1.0]
    with pytest.raises(DynPoseError):
        bench.parse_fractions("-0.1")


def test_tiny_real_run(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    # a few confident detections on two images keep the real-image parts short
    dets = json.loads((coco_dir / "test_coco_det_AP_H_56.json").read_text())
    keep: dict[int, list] = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        if d["image_id"] in (785, 40083) and len(keep.setdefault(d["image_id"], [])) < 2:
            keep[d["image_id"]].append(d)
    (tmp_path / "dets.json").write_text(json.dumps([d for v in keep.values() for d in v]))
    out, png = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    args = ["--engine-dir", str(tinypose_engine_dir), "--batch", "1,2", "--fractions", "0,1", "--repeats", "1"]
    args += ["--warmup", "0", "--images", str(coco_dir), "--detections", str(tmp_path / "dets.json")]
    args += ["--route", "fraction:0.5", "--policies", "box:20000,band:0.1,0.9", "--json", str(out), "--plot", str(png)]
    run = CliRunner().invoke(bench_main, args)
    assert run.exit_code == 0, run.output
    print(run.stdout)
    r = json.loads(out.read_text())
    assert r["schema"] == "dynpose.bench"
    for key in (
        "created",
        "machine",
        "versions",
        "config",
        "crops",
        "ratio_vs_large",
        "pipeline",
        "wall_s",
        "costs",
        "load",
    ):
        assert key in r
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert "onnxruntime" in r["versions"]
    assert set(r["config"]["models"]) == {"router", "small", "large"}
    assert r["crop_inputs"] == "real"
    names = {(row["batch"], row["config"], row["fraction"]) for row in r["crops"]}
    # large-only twice: alone on every core and on the Dispatcher's share (a busy machine can run the second faster)
    want = [("large-only", None), ("large-only (split threads)", None), ("small-only", None), ("dynpose", 0.0)]
    want += [("dynpose", 1.0)]
    want += [("box:20000", None), ("band:0.1,0.9", None)]
    assert names == {(b, c, f) for b in (1, 2) for c, f in want}
    for row in r["crops"]:
        assert row["crops"] == 4  # a sample is one pass over the 4 real boxes, in calls of `batch`
        assert row["crops_per_s"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
        assert len(row["samples_ms"]) == 1 and row["ratio_ci"] is None  # one round: no interval yet
        assert row["num_large"] + row["num_small"] == 4
        want_large = {"large-only": 4, "large-only (split threads)": 4, "small-only": 0}.get(row["config"])
        if row["config"] == "dynpose":
            want_large = 0 if row["fraction"] == 0 else 4
        if want_large is not None:
            assert row["num_large"] == want_large, row
    # baselines alone on every core, routed configurations on the engine set's split
    solo = [row for row in r["crops"] if row["config"] == "large-only"][0]
    routed = [row for row in r["crops"] if row["config"] == "dynpose"][0]
    assert solo["threads"]["large"] == r["threads"]["solo"] >= routed["threads"]["large"]
    assert set(r["ratio_vs_large"]) == {"1", "2"} and {"0", "1", "box:20000"} <= set(r["ratio_vs_large"]["2"])
    assert [t["stopped"] for t in r["timing"]] == ["fixed", "fixed"]
    for b in (1, 2):  # ratios are taken to the faster large-only: it is 1.00x, the other one at most that
        mine = [row for row in r["crops"] if row["batch"] == b]
        (ref,) = [row for row in mine if row["reference"]]
        assert ref["config"].startswith("large-only") and ref["ratio_vs_large"] == pytest.approx(1.0)
        assert all(row["ratio_vs_large"] <= 1.0 + 1e-9 for row in mine if row["config"].startswith("large-only"))
    # costs of every role at batch 1 and 8 (the manifest is untouched without --store-costs)
    assert set(r["costs"]["roles"]) == {"router", "small", "large"} and set(r["costs"]["roles"]["large"]["ms"]) == {"1", "8"}
    assert any(line.startswith("cost large") for line in r["cost_lines"])
    p = r["pipeline"]
    assert p["images"] == 2 and p["boxes"] == 4 and p["crops"] == 4 and p["fps"] > 0 and p["route"] == "fraction:0.5"
    assert set(p["breakdown_ms_per_frame"]) == {
        "decode_image",
        "crop",
        "router",
        "small",
        "large",
        "decode_keypoints",
        "rescore_nms",
    }
    assert 1 <= p["persons"] <= 4 and p["persons"] == p["persons_after_nms"]  # persons are counted after OKS-NMS
    assert p["routed_sequential"] == {"small": 2, "large": 2}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dynpose@1" in run.stdout and "pipeline:" in run.stdout and "[95% CI]" in run.stdout
    assert "tinypose_256x192 (onnx fp32" in run.stdout and "threads:" in run.stdout
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_default_outputs_and_store_costs(tinypose_engine_dir: Path, tmp_path: Path) -> None:
    import shutil

    from dynpose.engines.manifest import Manifest

    eng = Path(shutil.copytree(tinypose_engine_dir, tmp_path / "eng"))
    args = ["--engine-dir", str(eng), "--batch", "1", "--fractions", "", "--repeats", "2", "--warmup", "0"]
    run = CliRunner().invoke(bench_main, [*args, "--store-costs"])
    assert run.exit_code == 0, run.output
    (js,) = (eng / "bench").glob("bench-ort-cpu-*.json")  # JSON and plot by default, under the engine dir
    assert js.with_suffix(".png").is_file()
    rows = json.loads(js.read_text())["crops"]
    assert {row["config"] for row in rows} == {"large-only", "large-only (split threads)", "small-only"}
    assert all(row["ratio_ci"] is not None for row in rows if not row["reference"])
    m = Manifest.load(eng)
    costs = m.costs("ort", "cpu")
    assert costs is not None and set(costs.roles) == {Role.ROUTER, Role.SMALL, Role.LARGE}
    assert costs.roles[Role.SMALL].sha256 == m.require(Role.SMALL, "onnx").sha256
    assert "routing beats large-only" in run.stdout or "cannot pay" in run.stdout
    assert m.costs("ort", "cuda") is None and Manifest.load(tinypose_engine_dir).costs("ort", "cpu") is None


def test_help() -> None:
    run = CliRunner().invoke(bench_main, ["--help"])
    assert run.exit_code == 0 and "Examples" in run.output and "--fractions" in run.output


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every benchmark script imports against today's package (mypy checks their calls; this catches a module that
    is gone, which mypy's ignore_missing_imports lets through)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    name = f"dynpose_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)


def test_accuracy_table_markdown_and_readme_section(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"
    spec = importlib.util.spec_from_file_location("dynpose_accuracy_table", path)
    assert spec is not None and spec.loader is not None
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    md = acc.markdown({"fp32": {"large only": 0.8, "small only": 0.6}, "int8": {}}, ["fp32", "int8"])
    assert md.splitlines()[2] == "| large only | 0.800 | n/a |"
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## INT8\ntext kept\n")
    acc.write_readme("## Accuracy\nv1", readme)
    acc.write_readme("## Accuracy\nv2", readme)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\n## INT8\ntext kept\n") and "v2" in text and "v1" not in text
    assert text.count(acc.START) == 1


# -- intervals, stopping, machine load ---------------------------------------------------------------------------------
def test_paired_ratio_ci_covers_the_true_ratio_and_narrows() -> None:
    from dynpose.bench.stats import paired_ratio_ci

    rng = np.random.default_rng(0)
    # a shared, noisy machine: each round is slowed by a common factor, plus independent noise per configuration
    slow = rng.uniform(1.0, 3.0, 200)
    ref = 0.10 * slow * rng.lognormal(0, 0.05, 200)
    test = 0.05 * slow * rng.lognormal(0, 0.05, 200)
    few, many = paired_ratio_ci(ref[:6], test[:6]), paired_ratio_ci(ref, test)
    # a 95% interval misses now and then: allow a hair beyond it (seeded, so this is deterministic anyway)
    assert few.lo - 0.01 <= 2.0 <= few.hi + 0.01 and many.lo - 0.01 <= 2.0 <= many.hi + 0.01
    assert many.half_width < few.half_width and many.half_width < 0.05
    assert "x [" in many.text() and paired_ratio_ci([1.0], [1.0]).text() == "1.00x [?]"


def test_timed_rounds_stop_when_the_interval_is_tight_or_time_is_up() -> None:
    import time

    from dynpose.bench.timing import RoundSpec, timed_rounds

    configs = {"ref": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.002)}
    r = timed_rounds(configs, "ref", RoundSpec(min_rounds=3, max_rounds=400, time_limit_s=20, warmup=0, target=0.25))
    assert r.stopped == "converged" and 3 <= r.rounds < 400
    assert r.ci("fast", "ref").half_width <= 0.25 and len(r.others_cores) == r.rounds
    capped = timed_rounds(
        configs, "ref", RoundSpec(min_rounds=2, max_rounds=10_000, time_limit_s=0.05, warmup=0, target=1e-9)
    )
    assert capped.stopped == "time limit" and capped.rounds >= 2
    fixed = timed_rounds(configs, "ref", RoundSpec(min_rounds=4, max_rounds=4, warmup=1))
    assert fixed.stopped == "fixed" and fixed.rounds == 4
    with pytest.raises(DynPoseError, match="rounds"):
        RoundSpec(min_rounds=5, max_rounds=2).validate()


def test_load_monitor_sees_another_busy_process() -> None:
    import subprocess
    import sys
    import time

    from dynpose.bench.load import load_summary, load_warning, others_cores, sample

    a = sample()
    if a is None:
        pytest.skip("no /proc on this system: the load is reported as unknown")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    spin.wait()
    busy = others_cores(a, sample())
    assert busy is not None and busy >= 0.5  # the child spun one core for the whole interval (and it is not us)
    t0, own0 = time.perf_counter(), sample()
    while time.perf_counter() - t0 < 0.3:  # our own work does not count as load
        pass
    assert others_cores(own0, sample()) is not None
    s = load_summary([busy, None, busy])
    assert s["rounds"] == 2 and s["loaded"] and "machine loaded" in (load_warning(s) or "")
    assert load_summary([0.0, 0.01])["loaded"] is False and load_warning(load_summary([])) is None


def test_solo_models_get_every_core(tinypose_engine_dir: Path) -> None:
    from dynpose.bench.timing import solo_models, threads_of
    from dynpose.runtime.engine_set import EngineSet, LoadOptions

    with EngineSet.load(tinypose_engine_dir, LoadOptions(threads=2), roles=(Role.SMALL, Role.LARGE)) as es:
        with solo_models(es, threads=2) as solo:
            assert threads_of(solo[Role.LARGE]) == 2 and threads_of(solo[Role.SMALL]) == 2
            assert threads_of(es.large) == threads_of(es.small) == 1  # the two workers split the cores
            assert solo[Role.LARGE].runner is not es.large.runner
        assert es.large.runner.session is not None  # the engine set's own runners stay open


def test_measure_and_store_costs(tinypose_engine_dir: Path, tmp_path: Path) -> None:
    import shutil

    from dynpose.bench.costs import measure_costs, model_costs, store_costs
    from dynpose.engines.manifest import Manifest
    from dynpose.roles import MODEL_ROLES
    from dynpose.runtime.engine_set import EngineSet

    eng = Path(shutil.copytree(tinypose_engine_dir, tmp_path / "eng"))
    with EngineSet.load(eng) as es:
        rec = measure_costs(es, batches=(1, 2), repeats=1, warmup=0)
    assert rec.shared_crop is True  # the 256x192 router crops like the large TinyPose
    for role in MODEL_ROLES:
        ms = rec.roles[role].ms[2]
        assert ms["total"] == pytest.approx(ms["crop"] + ms["infer"] + ms["decode"]) and ms["infer"] > 0
    assert rec.roles[Role.ROUTER].ms[2]["decode"] == 0.0
    store_costs(eng, rec)
    stored = Manifest.load(eng).costs("ort", "cpu")
    assert stored == rec  # the typed record round-trips through the manifest's JSON
    c = model_costs(stored, batch=8)  # nearest measured batch: 2
    assert c is not None and c.batch == 8 and c.large == rec.roles[Role.LARGE].ms[2]["total"]
    # a role whose entry changed since (another sha256) drops out of the stored costs
    m = Manifest.load(eng)
    m.notes["costs"]["ort/cpu"]["roles"]["small"]["sha256"] = "0" * 64
    m.save(eng)
    left = Manifest.load(eng).costs("ort", "cpu")
    assert left is not None and set(left.roles) == {Role.ROUTER, Role.LARGE}
    assert model_costs(left) is None  # no small model figure: nothing to say
