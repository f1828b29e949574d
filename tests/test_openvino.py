"""The OpenVINO backend: IRs from the real TinyPose ONNX files, the runner against ONNX Runtime, the compiled-model
cache, the export at every precision with its gate, the engine dir (content-named .xml + .bin, version and
instruction-set checks) and the bad inputs (OpenVINO missing, a CPU without bf16, a truncated .bin, a damaged cache,
an engine dir from another machine), each one line or a rebuild with a warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tinypose_card

from dynpose.engines.manifest import MANIFEST_NAME, Manifest
from dynpose.errors import DynPoseError
from dynpose.onnx_utils import open_session, rel_l2, run_session_all
from dynpose.roles import Role
from dynpose.runtime.backends.openvino import (
    CompileOptions,
    CpuInfo,
    OpenVinoRunner,
    check_ir_metadata,
    convert_onnx,
    cpu_info,
    kept_f32,
    read_ir,
    require_precision,
    save_ir,
    split_batch,
    weighted_layers,
)
from dynpose.runtime.backends.openvino.builder import with_fused_tails
from dynpose.runtime.backends.openvino.device import isa_level
from dynpose.runtime.engine_set import EngineSet, LoadOptions, thread_share

pytest.importorskip("openvino")


def one_line(e: pytest.ExceptionInfo[DynPoseError]) -> str:
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


@pytest.fixture(scope="module")
def ir_128(tmp_path_factory: pytest.TempPathFactory, tinypose_128: Path) -> Path:
    """The real TinyPose-128 as an f32 IR."""
    return save_ir(convert_onnx(tinypose_128), tmp_path_factory.mktemp("ir") / "tp128.xml")


@pytest.fixture(scope="module")
def ov_engine_dir(tmp_path_factory: pytest.TempPathFactory, tinypose_128: Path, tinypose_256: Path) -> Path:
    """TinyPose 128x96 small and 256x192 large as fp32 IRs (beside their ONNX), exported as a user would."""
    from dynpose.export.api import register_onnx

    d = tmp_path_factory.mktemp("ov_engines")
    register_onnx(tinypose_128, tinypose_card(96, 128), d, role=Role.SMALL, fmt="openvino", progress=False)
    register_onnx(tinypose_256, tinypose_card(192, 256), d, role=Role.LARGE, fmt="openvino", progress=False)
    return d


# -- pure parts --------------------------------------------------------------------------------------------------------
def test_batches_run_as_bucket_pieces() -> None:
    b = (1, 2, 4, 8)
    assert split_batch(1, b) == [(1, 1)]
    assert split_batch(3, b) == [(3, 4)]  # one padded crop of four
    assert split_batch(5, b) == [(4, 4), (1, 1)]  # three padded of eight would be more
    assert split_batch(7, b) == [(7, 8)]
    assert split_batch(13, b) == [(8, 8), (4, 4), (1, 1)]
    assert split_batch(12, (8,)) == [(8, 8), (4, 8)]  # only one bucket: pad
    assert sum(n for n, _ in split_batch(61, b)) == 61


def test_instruction_set_levels() -> None:
    zen4 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx2", "fma"}
    assert isa_level("x86_64", zen4, ()) == "avx512_core_bf16"
    assert isa_level("x86_64", zen4 - {"avx512_bf16"}, ()) == "avx512_core_vnni"
    assert isa_level("x86_64", {"avx2", "fma", "avx_vnni"}, ()) == "avx2_vnni"
    assert isa_level("x86_64", zen4 | {"amx_bf16", "amx_int8"}, ()) == "avx512_core_amx"
    assert isa_level("aarch64", set(), ("FP32", "FP16", "INT8")) == "aarch64+FP16"


def test_a_cpu_without_bf16_refuses_bf16() -> None:
    laptop = CpuInfo("2026.4.1-1-x", "avx2", "Intel Core i5-8250U", ("FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    with pytest.raises(DynPoseError) as e:
        require_precision("bf16", laptop)
    msg = one_line(e)
    assert "no BF16 instructions" in msg and "avx2" in msg and "--precision fp32" in msg
    require_precision("fp32", laptop)
    require_precision("int8", laptop)
    with pytest.raises(DynPoseError, match="no FP16 instructions"):
        require_precision("fp16", laptop)


def test_ir_metadata_check() -> None:
    here = CpuInfo("2026.4.1-22982-abc", "avx512_core_bf16", "AMD EPYC", ("BF16", "FP32", "INT8"))
    same = {"openvino_version": "2026.4.1-1-other-build", "isa": "avx512_core_bf16", "cpu": "AMD EPYC"}
    check_ir_metadata(same, here, "w")  # another build of the same release runs the same IR
    for changed, match in (
        ({"isa": "avx2"}, "for avx2 .* this machine has OpenVINO 2026.4.1 and avx512_core_bf16"),
        ({"openvino_version": "2025.3.0-1"}, "OpenVINO 2025.3.0 .* re-export"),
    ):
        with pytest.raises(DynPoseError, match=match) as e:
            check_ir_metadata({**same, **changed}, here, "engine dir X: large IR large.xml")
        one_line(e)
    with pytest.raises(DynPoseError, match="no 'openvino' export metadata"):
        check_ir_metadata(None, here, "w")


def test_thread_share_is_the_same_for_openvino_and_onnx_runtime() -> None:
    for role, want in ((Role.SMALL, 2), (Role.LARGE, 2), (Role.ROUTER, 4)):
        assert thread_share(role, "openvino", "cpu", 4) == thread_share(role, "ort", "cpu", 4) == {"intra_op_threads": want}
    assert thread_share(Role.SMALL, "tensorrt", "cuda", 4) == {}


# -- the runner ----------------------------------------------------------------------------------------------------------
def test_runner_matches_onnx_runtime(ir_128: Path, tinypose_128: Path) -> None:
    x = np.random.default_rng(0).standard_normal((13, 3, 128, 96)).astype(np.float32)
    ref = run_session_all(open_session(tinypose_128), x)
    with OpenVinoRunner(ir_128, CompileOptions(intra_op_threads=1), max_batch=8) as r:
        meta = r.input_metadata()
        assert (meta.name, meta.shape) == ("image", (None, 3, 128, 96))
        outs = r.infer_all(x)  # 13 > max batch 8: split by the base class, then into buckets
        assert r.last_inference_time() > 0
        for n in (1, 3, 5):
            assert rel_l2(r.infer(x[:n]), ref[0][:n]) < 1e-4
        with pytest.raises(DynPoseError, match="expected N x 3 x 128 x 96"):
            r.infer(np.zeros((1, 3, 64, 48), np.float32))
    assert [o.shape for o in outs] == [o.shape for o in ref]
    assert rel_l2(outs[0], ref[0]) < 1e-4
    with pytest.raises(DynPoseError, match="not active"):
        r.infer(x[:1])


def test_two_runners_in_two_threads(ir_128: Path) -> None:
    x = np.random.default_rng(1).standard_normal((6, 3, 128, 96)).astype(np.float32)
    one = CompileOptions(intra_op_threads=1)
    with OpenVinoRunner(ir_128, one) as a, OpenVinoRunner(ir_128, one) as b:
        alone = a.infer(x)
        got: dict[str, list[np.ndarray]] = {"a": [], "b": []}

        def work(r: OpenVinoRunner, k: str) -> None:
            for _ in range(3):
                got[k].append(r.infer(x))

        threads = [threading.Thread(target=work, args=(r, k)) for r, k in ((a, "a"), (b, "b"), (a, "a"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(got["a"]) == 6 and len(got["b"]) == 3
    for out in got["a"] + got["b"]:
        np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-6)


def test_layers_kept_f32_run_in_f32_under_bf16(tmp_path: Path, ir_128: Path) -> None:
    import openvino as ov

    if not cpu_info().supports("bf16"):
        pytest.skip("this CPU has no bf16 instructions")
    model = read_ir(ir_128)
    keep = weighted_layers(model)[-3:]  # the layers nearest the output
    xml = save_ir(model, tmp_path / "marked.xml", keep)
    assert kept_f32(read_ir(xml)) == keep
    m = read_ir(xml)
    m.reshape([1, 3, 128, 96])
    compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True})
    req = compiled.create_infer_request()
    req.infer({0: np.zeros((1, 3, 128, 96), np.float32)})
    kinds = {p.node_name: p.exec_type for p in req.profiling_info}
    assert all(kinds[n].endswith("f32") for n in keep), {n: kinds[n] for n in keep}
    others = [kinds[n] for n in weighted_layers(model)[:-3] if n in kinds]
    assert any(k.endswith("bf16") for k in others)
    with pytest.raises(DynPoseError, match="no layer named"):
        save_ir(read_ir(ir_128), tmp_path / "bad.xml", ["no_such_layer"])
    # a layer stays f32 with the bias / residual adds fused into it: a convolution marked without them made the CPU
    # plugin refuse TinyPose-128 in bf16 ("object is not initialized"); with them every layer set compiles
    layers = weighted_layers(model)
    units = with_fused_tails(model, layers)
    assert set(layers) < set(units)
    x = np.random.default_rng(4).standard_normal((2, 3, 128, 96)).astype(np.float32)
    f32, bf16 = CompileOptions("f32", buckets=(2,)), CompileOptions("bf16", buckets=(2,))
    with OpenVinoRunner(ir_128, f32) as full, OpenVinoRunner(ir_128, bf16) as plain:
        ref = full.infer(x)
        err_plain = rel_l2(plain.infer(x), ref)
    with OpenVinoRunner(save_ir(read_ir(ir_128), tmp_path / "all.xml", units), bf16) as marked:
        err_marked = rel_l2(marked.infer(x), ref)
    assert err_marked < err_plain / 2, (err_marked, err_plain)  # the arithmetic is f32 (only glue ops stay bf16)


def test_compiled_model_cache(tmp_path: Path, ir_128: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    x = np.random.default_rng(2).standard_normal((2, 3, 128, 96)).astype(np.float32)
    with OpenVinoRunner(ir_128, CompileOptions(cache_dir=cache)) as r:
        first = r.infer(x)
        assert not r.loaded_from_cache
    blobs = sorted(cache.glob("*.blob"))
    assert len(blobs) == 4  # one per batch bucket
    with OpenVinoRunner(ir_128, CompileOptions(cache_dir=cache)) as r:
        assert r.loaded_from_cache  # second start: no compilation
        np.testing.assert_allclose(r.infer(x), first, rtol=1e-5, atol=1e-6)
    # a damaged cache: truncated and overwritten entries are rebuilt, with a warning, never fatal
    blobs[0].write_bytes(blobs[0].read_bytes()[: blobs[0].stat().st_size // 3])
    blobs[1].write_bytes(b"not a compiled model")
    with caplog.at_level(logging.WARNING), OpenVinoRunner(ir_128, CompileOptions(cache_dir=cache)) as r:
        np.testing.assert_allclose(r.infer(x), first, rtol=1e-5, atol=1e-6)
    assert "rebuilt it" in caplog.text
    with OpenVinoRunner(ir_128, CompileOptions(cache_dir=cache)) as r:
        assert r.loaded_from_cache
    # a cache folder that cannot be made: every start compiles, with a warning
    blocker = tmp_path / "file"
    blocker.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING), OpenVinoRunner(ir_128, CompileOptions(cache_dir=blocker / "cache")) as r:
        np.testing.assert_allclose(r.infer(x), first, rtol=1e-5, atol=1e-6)
    assert "cannot create the compiled-model cache" in caplog.text


def test_truncated_or_missing_weights_are_one_line(tmp_path: Path, ir_128: Path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_bytes(ir_128.read_bytes())
    xml.with_suffix(".bin").write_bytes(ir_128.with_suffix(".bin").read_bytes()[:100_000])
    with pytest.raises(DynPoseError, match="cannot read it .*Incorrect weights in bin file.*re-export") as e:
        OpenVinoRunner(xml).activate()
    one_line(e)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(DynPoseError, match="t.bin is missing") as e:
        OpenVinoRunner(xml).activate()
    one_line(e)


# -- the engine dir ------------------------------------------------------------------------------------------------------
def test_engine_dir_runs_with_backend_openvino(ov_engine_dir: Path, shared: Path) -> None:
    import cv2

    import dynpose

    m = Manifest.load(ov_engine_dir)
    for role in (Role.SMALL, Role.LARGE):
        e = m.require(role, "openvino")
        assert e.precision == "fp32" and e.file.endswith(".xml") and e.source == m.require(role, "onnx").file
        (bin_name,) = e.data_files
        assert bin_name.endswith(".bin") and bin_name != e.file.replace(".xml", ".bin")  # each named by its content
        assert e.openvino is not None and e.openvino["isa"] == cpu_info().isa
        assert e.checks["fp32_oks"] > 0.99  # OpenVINO f32 against ONNX Runtime fp32 on the 12 COCO persons
    image = cv2.imread(str(shared / "data" / "coco" / "000000000785.jpg"))
    boxes = [[280, 44, 218, 346]]
    with dynpose.Pipeline.from_engine_dir(ov_engine_dir, backend="openvino", route="all-large") as pipe:
        ov_person = pipe(image, boxes=boxes)[0]
    with dynpose.Pipeline.from_engine_dir(ov_engine_dir, backend="ort", route="all-large") as pipe:
        ort_person = pipe(image, boxes=boxes)[0]
    assert ov_person.model == "large"
    np.testing.assert_allclose(ov_person.keypoints[:, :2], ort_person.keypoints[:, :2], atol=0.5)
    assert list((ov_engine_dir / "openvino_cache").iterdir())  # the compiled-model cache lives in the engine dir


def test_engine_set_gives_each_model_its_share_of_the_cores(ov_engine_dir: Path) -> None:
    """--threads 2: the small and the large model one inference thread each (they run at the same time), one stream
    each; a model timed alone gets both, as with ONNX Runtime."""
    import openvino as ov

    with EngineSet.load(ov_engine_dir, LoadOptions(backend="openvino", threads=2)) as es:
        for role in (Role.SMALL, Role.LARGE):
            runner = es.require(role).runner
            assert isinstance(runner, OpenVinoRunner)
            assert runner.compiled_property("INFERENCE_NUM_THREADS") == 1
            assert runner.compiled_property("NUM_STREAMS") == 1
            assert runner.compiled_property("INFERENCE_PRECISION_HINT") == ov.Type.f32  # fp32 entries run f32
        solo = es.solo_model(Role.LARGE, threads=2)
        try:
            assert isinstance(solo.runner, OpenVinoRunner) and solo.runner.compiled_property("INFERENCE_NUM_THREADS") == 2
        finally:
            solo.runner.deactivate()


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("openvino_cache"))
    return dst


def _edit_entry(engine_dir: Path, role: str, **changes: object) -> None:
    path = engine_dir / MANIFEST_NAME
    d = json.loads(path.read_text())
    for e in d["entries"]:
        if e["role"] == role and e["format"] == "openvino":
            e["openvino"].update(changes)
    path.write_text(json.dumps(d))


def test_engine_dir_from_another_machine_is_refused(tmp_path: Path, ov_engine_dir: Path) -> None:
    d = _copy_dir(ov_engine_dir, tmp_path / "moved")
    _edit_entry(d, Role.LARGE, isa="avx2", cpu="Intel Core i5-8250U")
    with pytest.raises(DynPoseError, match=r"exported with OpenVINO .* for avx2 \(Intel Core i5-8250U\); this machine") as e:
        EngineSet.load(d, LoadOptions(backend="openvino"))
    assert "re-export it here with dynpose-export --format openvino" in one_line(e)
    _edit_entry(d, Role.LARGE, isa=cpu_info().isa, openvino_version="2025.2.0-18389-abc")
    with pytest.raises(DynPoseError, match="OpenVINO 2025.2.0") as e:
        EngineSet.load(d, LoadOptions(backend="openvino"))
    one_line(e)
    EngineSet.load(d, LoadOptions(backend="ort")).close()  # its ONNX entries still run on ONNX Runtime


def test_truncated_bin_in_an_engine_dir_is_one_line(tmp_path: Path, ov_engine_dir: Path) -> None:
    d = _copy_dir(ov_engine_dir, tmp_path / "cut")
    (bin_name,) = Manifest.load(d).require(Role.SMALL, "openvino").data_files
    data = (d / bin_name).read_bytes()
    (d / bin_name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DynPoseError, match=f"{bin_name} has .* bytes, manifest says .*re-export") as e:
        EngineSet.load(d, LoadOptions(backend="openvino"))
    one_line(e)


def test_openvino_missing_is_one_line(tmp_path: Path, tinypose_128: Path, ov_engine_dir: Path) -> None:
    """In a Python where `import openvino` fails, the export and the runtime each say which extra to install."""
    code = "import sys; sys.modules['openvino'] = None\nfrom dynpose.cli.export import main\nmain()\n"
    card = REPO / "examples" / "cards" / "tinypose_128x96.json"
    args = ["--onnx", str(tinypose_128), "--card", str(card), "--role", "small", "--format", "openvino"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code, *args, "--engine-dir", str(tmp_path / "e")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'dynpose[openvino]'" in lines[0], r.stderr
    assert not (tmp_path / "e" / MANIFEST_NAME).exists()  # refused before anything was written
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from dynpose.errors import DynPoseError\n"
        "from dynpose.runtime.engine_set import EngineSet, LoadOptions\n"
        "try:\n    EngineSet.load(sys.argv[1], LoadOptions(backend='openvino'))\n"
        "except DynPoseError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(ov_engine_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.stdout.strip().startswith("OpenVINO is not installed: pip install 'dynpose[openvino]'"), r.stdout + r.stderr


def test_bf16_and_auto_need_format_openvino(tmp_path: Path, tinypose_128: Path) -> None:
    from dynpose.export.api import register_onnx

    for precision in ("bf16", "auto"):
        with pytest.raises(DynPoseError, match="add --format openvino") as e:
            register_onnx(tinypose_128, tinypose_card(96, 128), tmp_path, role=Role.SMALL, precision=precision)
        one_line(e)


# -- precisions ---------------------------------------------------------------------------------------------------------
def test_auto_keeps_the_fastest_gated_precision(tmp_path: Path, tinypose_128: Path) -> None:
    """auto on the real TinyPose-128 without calibration data: fp32 and (on a bf16 CPU) bf16, each judged on the 12
    COCO persons against ONNX Runtime fp32 and timed; the kept one is recorded with every figure."""
    from dynpose.export.api import register_onnx

    entries = register_onnx(
        tinypose_128, tinypose_card(96, 128), tmp_path, role=Role.SMALL, fmt="openvino", precision="auto", progress=False
    )
    (e,) = [e for e in entries if e.format == "openvino"]
    meta = e.openvino
    assert meta is not None and meta["asked"] == "auto"
    cands = meta["candidates"]
    assert set(cands) >= {"fp32", "onnxruntime fp32"}
    timed = {k: v["ms_per_crop_b8"] for k, v in cands.items() if k != "onnxruntime fp32" and v["passed"]}
    assert meta["kept"] == min(timed, key=lambda k: timed[k])
    assert e.precision == meta["precision"] == meta["kept"]
    if cpu_info().supports("bf16"):
        assert "bf16" in cands and e.checks.get("bf16_oks", 1.0) >= 0.95 or e.precision == "fp32"
    assert meta["inference_precision"] == {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[e.precision]
    with EngineSet.load(tmp_path, LoadOptions(backend="openvino"), roles=[Role.SMALL]) as es:
        runner = es.require(Role.SMALL).runner
        assert isinstance(runner, OpenVinoRunner) and runner.inference_precision == meta["inference_precision"]
        marked = kept_f32(read_ir(tmp_path / e.file, tmp_path / next(iter(e.data_files))))
        assert sorted(marked) == sorted(meta["f32_layers"])  # the IR carries the f32 layers the entry lists


@pytest.mark.slow
def test_int8_from_qdq_and_nncf(tmp_path: Path, tinypose_128: Path, shared: Path) -> None:
    """INT8 for OpenVINO: the Q/DQ calibration (judged in OpenVINO) and NNCF's, the faster kept; with the gate off
    (--min-oks 0) so each path quantizes once."""
    from dynpose.export.api import register_onnx
    from dynpose.export.calibration.crops import CalibSpec

    spec = CalibSpec.from_root(shared / "data")
    spec.max_crops = 16
    entries = register_onnx(
        tinypose_128,
        tinypose_card(96, 128),
        tmp_path,
        role=Role.SMALL,
        fmt="openvino",
        precision="int8",
        calib=spec,
        min_oks=0.0,
        progress=False,
    )
    (e,) = [e for e in entries if e.format == "openvino"]
    assert e.precision == "int8" and e.openvino is not None
    assert set(e.openvino["candidates"]) == {"int8 (qdq)", "int8 (nncf)", "onnxruntime fp32"}
    assert e.openvino["int8_source"] in ("qdq", "nncf") and e.openvino["inference_precision"] == "f32"
    assert e.checks["int8_source"] == e.openvino["int8_source"]
    x = np.random.default_rng(3).standard_normal((3, 3, 128, 96)).astype(np.float32)
    with EngineSet.load(tmp_path, LoadOptions(backend="openvino"), roles=[Role.SMALL]) as es:
        assert np.isfinite(es.require(Role.SMALL).runner.infer(x)).all()


def test_cli_export_stores_openvino_costs(tmp_path: Path, tinypose_128: Path, ov_engine_dir: Path) -> None:
    """`dynpose-export --format openvino` times the engine dir's IRs afterwards, as it does ONNX and plans: the
    per-crop costs go into the manifest under openvino/cpu."""
    from click.testing import CliRunner

    from dynpose.cli.export import main

    d = _copy_dir(ov_engine_dir, tmp_path / "costs")
    card = REPO / "examples" / "cards" / "tinypose_128x96.json"
    args = ["--onnx", str(tinypose_128), "--card", str(card), "--role", "small", "--format", "openvino"]
    r = CliRunner().invoke(main, [*args, "--engine-dir", str(d), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "cost small" in r.output and "cost large" in r.output
    costs = Manifest.load(d).costs("openvino", "cpu")
    assert costs is not None and set(costs.roles) == {Role.SMALL, Role.LARGE}
    assert costs.roles[Role.SMALL].precision == "fp32"
