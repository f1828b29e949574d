"""Both pose models on every person of unlabelled footage: the data of label-free routing calibration.

Frames and boxes come as for label-free router training (`unlabelled.py`: image folders, images and videos; a
frame's boxes from the `--detections` files by numeric image id, else from the detector; small and low-scoring boxes
dropped), but each person is cropped once, exactly as the runtime crops it (no augmented variants: the figures are
about the persons a run will see). Frames are planned in groups of about `PAIR_BATCH` persons and run by
`execute.run_both` (the small and the large model on every person, a worker each), the router's scores beside them
when the engine dir has one. The arrays are cached under the engine dir, keyed by the model files, every source
file's content, the box sources and the sampling settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.bench.agreement import FileStamp, FootageRecord, ModelStamp, model_stamps
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.roles import POSE_ROLES, Role
from dynpose.router.collect import CACHE_DIRNAME, PAIR_BATCH, _Cached
from dynpose.router.unlabelled import UnlabelledSpec, _frame_boxes, _frames, _load_dets
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.plan import FrameInput, Purpose, Work

log = logging.getLogger(__name__)

FOOTAGE_CACHE_VERSION = 1


@dataclass
class FootageOutputs(_Cached):
    """Per person of the footage (frames in reading order, boxes of a frame together)."""

    frame: np.ndarray  # (N,) index of the frame among the frames read (the unit of the held-out split)
    boxes: np.ndarray  # (N,5) x, y, w, h, score
    kpts_small: np.ndarray  # (N,K,3) in image pixels
    kpts_large: np.ndarray
    router: np.ndarray  # (N,) router score[1]; NaN without a router
    frames_read: np.ndarray  # () frames read, with or without persons

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def areas(self) -> np.ndarray:
        return self.boxes[:, 2] * self.boxes[:, 3]


@dataclass(frozen=True)
class FootageData:
    """The outputs, what they were measured on (`FootageRecord`) and with (`ModelStamp`s)."""

    outputs: FootageOutputs
    record: FootageRecord
    models: dict[Role, ModelStamp]


def _detector_sha(manifest: Manifest, spec: UnlabelledSpec) -> str | None:
    from dynpose.fileio import sha256_file

    if spec.detector is not None:
        return sha256_file(spec.detector)
    det = manifest.get(Role.DETECTOR)
    return det.sha256 if det is not None else None


def _sampling(spec: UnlabelledSpec) -> dict[str, float]:
    return {
        "det_score": spec.det_score,
        "min_box": spec.min_box,
        "max_frames": spec.max_frames,
        "frame_step": spec.frame_step,
    }


def _key(models: dict[Role, ModelStamp], footage: FootageRecord, backend: str) -> str:
    d = {
        "version": FOOTAGE_CACHE_VERSION,
        "models": {r.value: s.sha256 for r, s in sorted(models.items())},
        "backend": backend,
        "footage": footage.sha256,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class FootageOptions:
    """Where the models run and how their outputs are cached."""

    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | os.PathLike | None = None
    use_cache: bool = True
    progress: bool = True


def footage_data(engine_dir: str | os.PathLike, spec: UnlabelledSpec, opts: FootageOptions) -> FootageData:
    """Both models (and the router) on every person of the footage, from the cache when the same files and
    settings made it before; a one-line error when the footage holds no person."""
    from dynpose.runtime.backends import BACKEND_FORMAT

    spec.validate()
    manifest = Manifest.load(engine_dir, verify=False)
    for role in POSE_ROLES:
        manifest.require(role, engine_dir=engine_dir)
    fmt = BACKEND_FORMAT.get(opts.backend, "onnx")
    models = model_stamps(manifest, (Role.ROUTER, *POSE_ROLES), fmt)
    stamp = FootageRecord(
        sources=tuple(FileStamp.of(s) for s in spec.sources),
        detections=tuple(FileStamp.of(d) for d in spec.detections),
        detector=_detector_sha(manifest, spec),
        sampling=_sampling(spec),
        frames=0,
        persons=0,
    )
    key = _key(models, stamp, opts.backend)
    path = Path(opts.cache_dir or Path(engine_dir) / CACHE_DIRNAME) / f"footage-{key[:16]}.npz"
    out = FootageOutputs.load(path, key) if opts.use_cache else None
    if out is None:
        out = _run(engine_dir, spec, opts, with_router=Role.ROUTER in models)
        if opts.use_cache:
            out.save(path, key)
    record = FootageRecord(
        stamp.sources, stamp.detections, stamp.detector, stamp.sampling, int(out.frames_read), len(out), stamp.sha256
    )
    return FootageData(out, record, models)


def _groups(spec: UnlabelledSpec, detector: Any, counts: list[int]) -> Iterator[list[tuple[int, FrameInput]]]:
    """(frame index, FrameInput) groups of about PAIR_BATCH persons; `counts` gets [frames read, frames without a
    box source]."""
    dets = _load_dets(spec)
    group: list[tuple[int, FrameInput]] = []
    persons = 0
    for fr in _frames(spec):
        i = counts[0]
        counts[0] += 1
        boxes = _frame_boxes(fr, dets, detector, spec)
        if boxes is None:
            counts[1] += 1
            continue
        f = FrameInput(fr.image_bgr, Boxes.of(boxes, fr.image_bgr.shape), nms=False)
        if not len(f.boxes):
            continue
        group.append((i, f))
        persons += len(f.boxes)
        if persons >= PAIR_BATCH:
            yield group
            group, persons = [], 0
    if group:
        yield group


def _run(engine_dir: str | os.PathLike, spec: UnlabelledSpec, opts: FootageOptions, with_router: bool) -> FootageOutputs:
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.execute import LocalExecutor, run_both

    roles = (Role.ROUTER, *POSE_ROLES) if with_router else POSE_ROLES
    load = LoadOptions(opts.backend, opts.device, opts.threads, detector=spec.detector, det_score=spec.det_score)
    parts: list[dict[str, np.ndarray]] = []
    counts = [0, 0]
    bar = _bar(opts.progress)
    with EngineSet.load(engine_dir, load, roles=roles) as es:
        models = {r: es.require(r) for r in roles}
        cards = {r: m.card for r, m in models.items()}
        with LocalExecutor(models) as ex:
            for group in _groups(spec, es.detector, counts):
                frames = [f for _, f in group]
                router = _router_scores(frames, cards, ex) if with_router else None
                small, large = run_both(frames, cards, ex)
                parts.append(
                    {
                        "frame": np.repeat([i for i, _ in group], [len(f.boxes) for f in frames]),
                        "boxes": np.concatenate([f.boxes.as_array() for f in frames]),
                        "kpts_small": small.keypoints,
                        "kpts_large": large.keypoints,
                        "score1": router() if router is not None else np.full(len(small.model), np.nan),
                    }
                )
                if bar is not None:
                    bar.update(len(group))
    if bar is not None:
        bar.close()
    if counts[1]:
        log.warning("%d frame(s) had no box source (no detections for their image id and no detector); skipped", counts[1])
    if not parts:
        raise DynPoseError(
            f"--unlabelled: no person found in {counts[0]} frame(s) of the footage (check --detections image ids, "
            "--det-score, or give a --detector / register one in the engine dir with `dynpose-export --detector`)"
        )
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return FootageOutputs(
        frame=cat["frame"].astype(np.int64),
        boxes=cat["boxes"].astype(np.float64),
        kpts_small=cat["kpts_small"].astype(np.float32),
        kpts_large=cat["kpts_large"].astype(np.float32),
        router=cat["score1"].astype(np.float64),
        frames_read=np.array(counts[0]),
    )


def _router_scores(frames: list[FrameInput], cards: dict[Role, Any], ex: Any) -> Any:
    """Submit the router on every person of `frames` (on its own worker, beside the pose models); returns a call
    that waits for the (N,) score[1]."""
    from dynpose.runtime.plan import make_plan
    from dynpose.runtime.policy import AllSmall

    plan = make_plan(frames, AllSmall(), cards)  # only its crops are used: the router's own work is submitted
    futures = ex.submit(plan, [Work(Role.ROUTER, np.arange(len(plan)), Purpose.SIGNAL)])

    def wait() -> np.ndarray:
        s = np.full(len(plan), np.nan)
        for f in futures:
            d = f.result()
            s[d.work.idx] = np.asarray(d.out, dtype=np.float64)[:, 1]
        return s

    return wait


def _bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="footage (small + large on every person)", unit="frame", leave=False)
