"""`dynpose-bench`: thin command line over `dynpose.bench` (the benchmark code; results and scripts in benchmarks/)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynpose.cli.common import check_finite, check_threads, user_errors, version_option
from dynpose.errors import DynPoseError

if TYPE_CHECKING:
    from dynpose.bench.options import BenchOptions

EPILOG = """\b
Examples:
  dynpose-bench --engine-dir engines/                    # figures to engines/bench/bench-*.json + .png
  dynpose-bench --engine-dir engines/ --batch 8 --fractions 0,0.3,1 --policies threshold:0.4,box:20000
  dynpose-bench --engine-dir engines/ --images coco/val2017 --detections dets.json --policies calibrated
  dynpose-bench --engine-dir engines/ --images coco/val2017 --detections dets.json --fractions '' \\
      --policies calibrated-families,cascade:0.6          # every family's calibrated policy, and a cascade
  dynpose-bench --engine-dir engines/ --store-costs --fractions '' --repeats 3   # per-crop costs into the manifest
  dynpose-bench --engine-dir engines/ --backend tensorrt --device cuda --batch 1,8,32,64

\b
Timing: interleaved rounds (each configuration once per round) until every ratio's 95% interval (bootstrap over
rounds) is within +-5% (--ci-target) or --time-limit seconds per batch size pass; --repeats N fixes N rounds.
Baselines (large-only, small-only) run alone on every core; routed configurations as the runtime loads them.
Defaults: CPU --batch 1,8, >= 5 rounds, 240 s per batch; CUDA --batch 1,8,32,64, >= 10 rounds, 120 s.
"""


def _policies(text: str | None, engine_dir: Path) -> tuple[str, ...]:
    """'a,b' policies; `calibrated` stands for the policy `dynpose-train-router --calibrate` stored (the manifest's
    route when there is no calibration), `calibrated-families` for the cheapest policy of every family it tried.
    Policies hold commas (band:LO,HI), so items are split at commas followed by a letter."""
    import re

    from dynpose.engines.manifest import Manifest
    from dynpose.runtime.policy import parse_policy

    if not text:
        return ()
    out = []
    for item in (p.strip() for p in re.split(r",(?=\s*[a-zA-Z])", text) if p.strip()):
        if item in ("calibrated", "route", "calibrated-families"):
            manifest = Manifest.load(engine_dir, verify=False)
            cal = manifest.calibration
            if item == "calibrated-families":
                if cal is None or not isinstance(cal.figures.get("per_family"), dict):
                    raise DynPoseError(
                        f"--policies calibrated-families: {engine_dir} holds no calibration with per-family policies; "
                        "run `dynpose-train-router --calibrate` first"
                    )
                stored = [parse_policy(w["policy"]) for w in cal.figures["per_family"].values()]
                out += [str(p) for p in stored if p.fixed_share() not in (0.0, 1.0)]  # the baselines run anyway
                continue
            item = cal.policy if cal is not None and item == "calibrated" else manifest.route
        out.append(str(parse_policy(item)))
    return tuple(dict.fromkeys(out))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EPILOG)
@version_option
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine dir with manifest.json.")
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch", "openvino"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batch", default=None, help="Comma-separated batch sizes (crops per call).")
@click.option(
    "--fractions",
    default="0,0.1,0.3,0.5,0.7,0.9,1",
    show_default=True,
    help="Shares of crops sent to the large model (DynPose with policy fraction:F); '' for none.",
)
@click.option(
    "--policies",
    default=None,
    help="More policies to time; 'calibrated' = the calibrated route, 'calibrated-families' = each family's.",
)
@click.option("--images", type=click.Path(path_type=Path), help="Images folder: the crop part runs on their real boxes.")
@click.option("--detections", type=click.Path(path_type=Path), help="COCO-format person detections for --images.")
@click.option("--synthetic-crops", is_flag=True, help="With --images: time the crop part on synthetic boxes anyway.")
@click.option("--route", default=None, help="Routing policy of the pipeline part (default: the manifest's).")
@click.option("--threads", type=int, default=None, help="CPU cores to use (default: all); the two pose models share them.")
@click.option("--repeats", type=int, default=None, help="Exactly this many timed rounds (no adaptive stopping).")
@click.option("--min-rounds", type=int, default=None, help="Rounds before the intervals are checked.")
@click.option("--max-rounds", type=int, default=1000, show_default=True, help="Most rounds per batch size.")
@click.option("--time-limit", type=float, default=None, help="Seconds of timing per batch size before giving up.")
@click.option("--ci-target", type=float, default=0.05, show_default=True, help="Stop when every interval is +- this.")
@click.option("--warmup", type=int, default=None, help="Untimed calls per configuration before timing.")
@click.option("--fp16", is_flag=True, help="torch backend: run the models in half precision (outputs fp32).")
@click.option("--channels-last", is_flag=True, help="torch backend: NHWC memory layout for models and inputs.")
@click.option(
    "--cuda-graphs", is_flag=True, help="torch backend, CUDA: one CUDA graph per batch bucket 1,2,4,..,max (padded)."
)
@click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the models (slow first calls).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds synthetic frames, boxes and the bootstrap.")
@click.option("--store-costs", is_flag=True, help="Write the measured per-crop costs into the manifest (notes.costs).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Figures JSON [default: ENGINE_DIR/bench/...].")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Plot PNG [default: ENGINE_DIR/bench/...].")
@click.option("--no-save", is_flag=True, help="Print only; write no JSON or plot unless --json/--plot name them.")
@user_errors
def main(engine_dir: Path, **kw: Any) -> None:
    """Throughput of large-only, small-only, DynPose at routing fractions and routing policies (crops/s, latency,
    speed against large-only with 95% intervals), per-crop costs and break-even fraction, and end-to-end pipeline
    frames/s with a per-stage breakdown on real images."""
    from dynpose import bench

    opts = _options(engine_dir, kw)
    result = bench.run_benchmark(engine_dir, opts, log=lambda m: click.echo(m, err=True))
    for line in bench.summary_lines(result):
        click.echo(line)
    for key, what in (("json_path", "figures"), ("plot_path", "plot"), ("costs_stored_in", "costs")):
        if result.get(key):
            click.echo(f"wrote {what} to {result[key]}")


def _options(engine_dir: Path, kw: dict[str, Any]) -> BenchOptions:
    """The run's `BenchOptions` from the flags (each checked, one-line errors)."""
    from dynpose import bench
    from dynpose.bench.options import DEFAULTS, BenchOptions

    _guard(engine_dir, kw)
    device = str(kw["device"])
    batches = tuple(bench.parse_batches(kw["batch"])) if kw["batch"] is not None else ()
    fracs = tuple(bench.parse_fractions(kw["fractions"])) if str(kw["fractions"]).strip() else ()
    threads = check_threads(kw["threads"])
    check_finite("--time-limit", kw["time_limit"], lo=1e-9)
    check_finite("--ci-target", kw["ci_target"], lo=1e-9)
    if kw["route"] is not None:
        from dynpose.runtime.policy import parse_policy

        parse_policy(str(kw["route"]))
    if device not in DEFAULTS:
        raise DynPoseError(f"--device {device!r}: use cpu or cuda")
    backend_options = _torch_options(kw, str(kw["backend"]), device)
    base = DEFAULTS[device]["rounds"]
    repeats = kw["repeats"]
    lo = repeats if repeats is not None else (kw["min_rounds"] or base.min_rounds)
    hi = repeats if repeats is not None else max(kw["max_rounds"], lo)
    rounds = bench.RoundSpec(
        min_rounds=lo,
        max_rounds=hi,
        time_limit_s=kw["time_limit"] or base.time_limit_s,
        warmup=base.warmup if kw["warmup"] is None else kw["warmup"],
        target=kw["ci_target"],
    )
    return BenchOptions(
        backend=str(kw["backend"]),
        device=device,
        batches=batches,
        fractions=fracs,
        policies=_policies(kw["policies"], engine_dir) if kw["policies"] else (),
        rounds=rounds,
        threads=threads,
        seed=int(kw["seed"]),
        images=kw["images"],
        detections=kw["detections"],
        route=kw["route"],
        real_crops=not kw["synthetic_crops"],
        json_out=kw["json_out"],
        plot_out=kw["plot_out"],
        save=not kw["no_save"],
        store_costs=bool(kw["store_costs"]),
        backend_options=backend_options,
    )


def _guard(engine_dir: Path, kw: dict[str, Any]) -> None:
    """--json / --plot may not replace the engine dir's files (its bench/ folder is where figures go) or an input."""
    from dynpose.fileio import OutputGuard

    root = Path(engine_dir)
    own = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "bench"] if root.is_dir() else []
    guard = OutputGuard.of({"--engine-dir": own, "--detections": kw["detections"]}, sources={"--images": kw["images"]})
    guard.check_file(kw["json_out"], "--json")
    guard.check_file(kw["plot_out"], "--plot")


def _torch_options(kw: dict[str, Any], backend: str, device: str) -> dict[str, Any]:
    """--fp16 / --channels-last / --cuda-graphs / --compile: the torch backend's runner options."""
    flags = {
        "fp16": kw["fp16"],
        "channels_last": kw["channels_last"],
        "cuda_graphs": kw["cuda_graphs"],
        "compile": kw["compile_"],
    }
    options = {k: True for k, v in flags.items() if v}
    if options and backend != "torch":
        names = ", ".join("--" + k.replace("_", "-") for k in options)
        raise DynPoseError(f"{names}: torch backend options; use --backend torch (ort/tensorrt precision is in the files)")
    if flags["cuda_graphs"] and device != "cuda":
        raise DynPoseError("--cuda-graphs: CUDA graphs need --device cuda")
    return options


if __name__ == "__main__":
    main()
