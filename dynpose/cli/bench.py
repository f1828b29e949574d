"""`dynpose-bench`: thin command line over `dynpose.bench` (the benchmark code; results and scripts in benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import click

from dynpose.cli.common import user_errors
from dynpose.errors import DynPoseError

EPILOG = """\b
Examples:
  dynpose-bench --engine-dir engines/ --json bench.json --plot bench.png
  dynpose-bench --engine-dir engines/ --batch 1,8 --fractions 0,0.5,1 --repeats 3
  dynpose-bench --engine-dir engines/ --images coco/val2017 --detections dets.json
  dynpose-bench --engine-dir engines/ --backend tensorrt --device cuda --batch 1,8,32,64
  dynpose-bench --engine-dir engines/ --backend torch --device cuda --fp16 --channels-last --cuda-graphs

\b
Defaults: CPU: --batch 1,8 --repeats 5 --warmup 1 (under 10 minutes for HRNet-W32 + ResNet-50 on 2 cores);
CUDA: --batch 1,8,32,64 --repeats 20 --warmup 5. Fractions 0,0.1,0.3,0.5,0.7,0.9,1 (policy fraction:F).
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine dir with manifest.json.")
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", "batch", default=None, help="Comma-separated batch sizes (crops per call).")
@click.option(
    "--fractions",
    default="0,0.1,0.3,0.5,0.7,0.9,1",
    show_default=True,
    help="Shares of crops sent to the large model (DynPose with policy fraction:F).",
)
@click.option("--images", type=click.Path(path_type=Path), help="Images folder for the end-to-end pipeline part.")
@click.option("--detections", type=click.Path(path_type=Path), help="COCO-format person detections for --images.")
@click.option("--route", default=None, help="Routing policy of the pipeline part (default: the manifest's).")
@click.option("--threads", type=int, default=None, help="CPU cores to use (default: all); the two pose models share them.")
@click.option("--repeats", type=int, default=None, help="Timed rounds per configuration (round-robin).")
@click.option("--warmup", type=int, default=None, help="Untimed calls per configuration before timing.")
@click.option("--fp16", is_flag=True, help="torch backend: run the models in half precision (outputs fp32).")
@click.option("--channels-last", is_flag=True, help="torch backend: NHWC memory layout for models and inputs.")
@click.option(
    "--cuda-graphs", is_flag=True, help="torch backend, CUDA: one CUDA graph per batch bucket 1,2,4,..,max (padded)."
)
@click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the models (slow first calls).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write all figures to this JSON (atomic).")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Write crops/s vs fraction as PNG.")
@user_errors
def main(
    engine_dir: Path,
    backend: str,
    device: str,
    batch: str | None,
    fractions: str,
    images: Path | None,
    detections: Path | None,
    route: str | None,
    threads: int | None,
    repeats: int | None,
    warmup: int | None,
    fp16: bool,
    channels_last: bool,
    cuda_graphs: bool,
    compile_: bool,
    json_out: Path | None,
    plot_out: Path | None,
) -> None:
    """Throughput of large-only, small-only and DynPose at routing fractions (crops/s, p50/p95 latency), and
    end-to-end pipeline frames/s with a per-stage breakdown on real images."""
    from dynpose import bench

    batches = bench.parse_batches(batch) if batch is not None else None
    fracs = bench.parse_fractions(fractions)
    if threads is not None and threads < 1:
        raise DynPoseError(f"--threads {threads}: must be >= 1")
    if route is not None:
        from dynpose.runtime.policy import parse_policy

        parse_policy(route)
    torch_opts = {"fp16": fp16, "channels_last": channels_last, "cuda_graphs": cuda_graphs, "compile": compile_}
    backend_options = {k: True for k, v in torch_opts.items() if v}
    if backend_options and backend != "torch":
        flags = ", ".join("--" + k.replace("_", "-") for k in backend_options)
        raise DynPoseError(f"{flags}: torch backend options; use --backend torch (ort/tensorrt precision is in the files)")
    if cuda_graphs and device != "cuda":
        raise DynPoseError("--cuda-graphs: CUDA graphs need --device cuda")
    result = bench.run_benchmark(
        engine_dir,
        backend=backend,
        device=device,
        batches=batches,
        fractions=fracs,
        repeats=repeats,
        warmup=warmup,
        images=images,
        detections=detections,
        route=route,
        threads=threads,
        backend_options=backend_options,
        json_out=json_out,
        plot_out=plot_out,
        log=lambda m: click.echo(m, err=True),
    )
    for line in bench.summary_lines(result):
        click.echo(line)
    for p, what in ((json_out, "figures"), (plot_out, "plot")):
        if p is not None:
            click.echo(f"wrote {what} to {p}")


if __name__ == "__main__":  # python -m dynpose.cli.bench (no console script needed, e.g. a --no-deps install)
    main()
