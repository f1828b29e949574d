"""`dynpose-run --demo`: dynpose end to end on a fresh machine, offline, with files the package ships.

`prepare_demo` checks the shipped assets (sha256), finds or builds the demo engine dir in the user's cache
(`engine.demo_engine_dir`) and says what to run: the COCO sample images with their annotations (so the run prints
AP) and the sample video, or the user's own sources (`--demo --source X`). The CLI turns each `DemoJob` into its
ordinary run options, so the demo goes through the same path as any `dynpose-run`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dynpose.demo.assets import AssetIndex
from dynpose.demo.engine import ROUTE, DemoEngine, demo_engine_dir
from dynpose.demo.layout import COCO_ANN, COCO_DIR, COCO_IMAGES, VIDEO
from dynpose.errors import DynPoseError

DEFAULT_OUT_DIR = "dynpose-demo"


@dataclass(frozen=True)
class DemoRequest:
    """What the user asked for with `--demo` (the run's flags that decide the demo's files)."""

    sources: tuple[str, ...] = ()
    out_dir: str | None = None
    out: str | None = None
    vis: str | None = None
    eval_gt: str | None = None
    engine_dir: str | None = None
    box_files: tuple[str, ...] = ()  # the flags naming the user's box / annotation files that were given

    def check(self) -> None:
        if self.engine_dir is not None:
            raise DynPoseError("--demo brings its own engine dir; drop --engine-dir (or drop --demo to run yours)")
        mine = [f for f, v in (("--out", self.out), ("--vis", self.vis), ("--eval", self.eval_gt)) if v is not None]
        mine += list(self.box_files)
        if not self.sources and mine:
            raise DynPoseError(
                f"{', '.join(mine)}: --demo alone runs the shipped samples and writes into --out-dir; to run the demo "
                "models on your own files add --source"
            )


@dataclass(frozen=True)
class DemoJob:
    """One ordinary run of the demo: its sources, outputs and COCO annotations to score against.

    `track`: True for the sample video (ids per person), False for the sample images (tracking flags, which are
    for the video, do not apply), None for the user's sources (as the user asked)."""

    title: str
    sources: tuple[str, ...]
    out: str | None
    vis: str | None
    eval_gt: str | None
    track: bool | None


@dataclass(frozen=True)
class DemoPlan:
    engine: DemoEngine
    out_dir: Path
    jobs: tuple[DemoJob, ...]

    def intro(self) -> list[str]:
        how = "built now from the files dynpose ships" if self.engine.built else "from the cache"
        return [
            f"demo engine dir: {self.engine.path} ({how}): TinyPose 128x96 small, 256x192 large, a router with "
            "random weights, PicoDet person detector",
            f"default route {ROUTE}: boxes of at least 17734 px² go to the large model (calibrated for this pair; "
            "--route fraction:0.5 tries the router)",
        ]

    def outro(self) -> list[str]:
        lines = [f"demo results in {self.out_dir}/:"]
        for job in self.jobs:
            written = ([f"results {job.out}"] if job.out else []) + ([f"drawings in {job.vis}"] if job.vis else [])
            lines.append(f"  {job.title}: {', '.join(written)}")
        if not any(job.track is None for job in self.jobs):
            lines.append("your own files: dynpose-run --demo --source photo.jpg | folder/ | video.mp4 | 0 (webcam)")
        lines.append("real checkpoints: README.md, 'Main job' (dynpose-export, then dynpose-run --engine-dir)")
        return lines


def _sample_jobs(index: AssetIndex, out_dir: Path) -> tuple[DemoJob, ...]:
    video = Path(VIDEO)
    return (
        DemoJob(
            f"{len(COCO_IMAGES)} COCO sample images, scored against their annotations",
            (str(index.path(COCO_IMAGES[0]).parent),),
            out=str(out_dir / COCO_DIR / "results.json"),
            vis=str(out_dir / COCO_DIR),
            eval_gt=str(index.path(COCO_ANN)),
            track=False,
        ),
        DemoJob(
            f"sample video {video.name}, persons tracked",
            (str(index.path(VIDEO)),),
            out=str(out_dir / video.parent / f"{video.stem}.jsonl"),
            vis=str(out_dir / video.parent),
            eval_gt=None,
            track=True,
        ),
    )


def prepare_demo(
    request: DemoRequest, assets: str | os.PathLike | None = None, home: str | os.PathLike | None = None
) -> DemoPlan:
    """Check the request and the shipped files (`assets`: default the package's), find or build the demo engine
    dir (`home`: default `$DYNPOSE_HOME`), and list the runs to make."""
    request.check()
    index = AssetIndex.load(assets)
    index.verify()
    engine = demo_engine_dir(index, home)
    out_dir = Path(request.out_dir or DEFAULT_OUT_DIR)
    if not request.sources:
        return DemoPlan(engine, out_dir, _sample_jobs(index, out_dir))
    job = DemoJob(
        f"your source{'s' if len(request.sources) > 1 else ''} {', '.join(request.sources)}",
        request.sources,
        out=request.out or str(out_dir / "results.jsonl"),
        vis=request.vis or str(out_dir / "vis"),
        eval_gt=request.eval_gt,
        track=None,
    )
    return DemoPlan(engine, out_dir, (job,))


__all__ = ["DEFAULT_OUT_DIR", "DemoJob", "DemoPlan", "DemoRequest", "ROUTE", "prepare_demo"]
