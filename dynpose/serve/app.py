"""DynPose on Ray Serve: four deployments, composed with deployment handles.

    HTTP --> ingress (router + policy) --uint8 crops--> small pose model  (serve.batch across requests)
                 |                     --uint8 crops--> large pose model  (serve.batch across requests)
                 +--whole image (no boxes given)-----> detector

- `Ingress` (the HTTP entry; `ingress` replicas): reads and checks the request, decodes the image, asks the
  detector for boxes when none came, validates them (`Boxes.of`), plans them (`plan.make_plan`, the planner
  `Pipeline` uses) and runs the plan with `RemoteExecutor` (`execute.execute_async`): the router in the ingress,
  each pose model's uint8 crops (`Plan.crop`) sent to that model's deployment; then rescoring and OKS-NMS
  (`pipeline.persons_of`), so an answer is what `Pipeline` gives for the same image and boxes. With `--audit F`
  it then starts, without awaiting it, the large model on a share F of the small model's answers
  (`execute.audit_async`); the ingress's `Auditor` keeps the agreement (`/v1/stats`) and may steer the default
  route (`--audit-target`).
- `PoseModelDeployment` (`small` and `large`, each its own replica count): normalises, infers (+ flip) and decodes
  crops to image pixels. `serve.batch` gathers the crops of concurrent requests into one model run (up to
  `max_batch` crops, waiting at most `batch_wait_ms` for a batch to fill).
- `DetectorDeployment` (`detector`; only when the engine dir has a detector or `--detector` is given).

Crops are made in the ingress, not in the pose replicas: a crop is 37 kB (96x128) or 147 kB (192x256) of uint8
while the decoded image is ~0.9 MB (640x480), so a request with the usual few persons ships several times less
data to each pose replica (which may sit on another node), the pose replicas (GPUs) do only what needs them, and
the router's crops serve the large model when the two crop alike. Normalising (4x bigger in fp32) happens in the
pose replica. A replica that dies mid-request surfaces as a 503 with Retry-After, which the client retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from dynpose.errors import DynPoseError
from dynpose.roles import POSE_ROLES, Role
from dynpose.runtime.engine_set import LoadOptions
from dynpose.runtime.model import Router
from dynpose.runtime.plan import Done, Plan, Work
from dynpose.serve.config import ServeConfig, has_detector
from dynpose.serve.drain import DrainWatch
from dynpose.serve.http import HttpError, decode_request_image, one_line, parse_pose_request
from dynpose.serve.uploads import UploadGuard

log = logging.getLogger(__name__)
ENDPOINTS = {"/v1/pose": "POST", "/healthz": "GET", "/v1/info": "GET", "/v1/stats": "GET"}


@dataclass
class CropBatch:
    """One request's crops for one pose model (at most `max_batch` of them): uint8 (n,H,W,3) in the model's colour
    order, and the centres/scales (n,2) they were cropped at (decoding maps heatmaps back through them)."""

    crops: np.ndarray
    centers: np.ndarray
    scales: np.ndarray


def crops_in(items: list[CropBatch]) -> int:
    """serve.batch's batch size: crops, not calls (16 requests of one person each make a batch of 16)."""
    return sum(len(it.crops) for it in items)


@dataclass
class BatchStats:
    """What one pose replica has run: batches, crops, and how many crops / calls each batch held."""

    model: str
    replica: str
    actor: str
    batches: int = 0
    crops: int = 0
    calls: int = 0
    crops_hist: dict[int, int] = field(default_factory=dict)
    calls_hist: dict[int, int] = field(default_factory=dict)

    def add(self, crops: int, calls: int) -> None:
        self.batches += 1
        self.crops += crops
        self.calls += calls
        self.crops_hist[crops] = self.crops_hist.get(crops, 0) + 1
        self.calls_hist[calls] = self.calls_hist.get(calls, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "replica": self.replica,
            "actor": self.actor,
            "batches": self.batches,
            "crops": self.crops,
            "calls": self.calls,
            "crops_hist": dict(self.crops_hist),
            "calls_hist": dict(self.calls_hist),
        }


def _replica_names() -> tuple[str, str]:
    import ray

    ctx = serve.get_replica_context()
    return ctx.replica_id.unique_id, ray.get_runtime_context().get_actor_name() or ""


@serve.deployment
class PoseModelDeployment:
    """One pose model (`role` small or large) of the engine dir; crops of concurrent requests run as one batch."""

    def __init__(self, role: Role, cfg: ServeConfig) -> None:
        from dynpose.runtime.engine_set import EngineSet
        from dynpose.runtime.model import PoseModel

        self.role = role
        self.flip = cfg.flip
        self.engines = EngineSet.load(cfg.engine_dir, _load_options(cfg, with_detector=False), roles=[role])
        model = self.engines.require(role)
        assert isinstance(model, PoseModel)
        self.model = model
        self.stats = BatchStats(role, *_replica_names())
        # serve.batch's parameters come from the flags; the decorator's are placeholders
        self.infer.set_max_batch_size(cfg.max_batch)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1e3)  # type: ignore[attr-defined]
        card = model.card
        self._run(
            [CropBatch(np.zeros((1, card.input_height, card.input_width, 3), np.uint8), np.ones((1, 2)), np.ones((1, 2)))]
        )
        self.stats = BatchStats(role, *_replica_names())  # the warm-up run is not a batch anyone sent

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=crops_in)
    async def infer(self, items: list[CropBatch]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Keypoints (n,K,3) in image pixels for each call's crops, and this replica's batch statistics."""
        kps = await asyncio.to_thread(self._run, items)
        snap = self.stats.snapshot()
        return [(k, snap) for k in kps]

    def _run(self, items: list[CropBatch]) -> list[np.ndarray]:
        # Runs off the event loop, so the replica keeps queueing the next batch while this one infers.
        crops = np.concatenate([it.crops for it in items])
        centers = np.concatenate([it.centers for it in items])
        scales = np.concatenate([it.scales for it in items])
        kps = self.model.run(crops, centers, scales, self.flip)
        self.stats.add(len(crops), len(items))
        bounds = np.cumsum([0] + [len(it.crops) for it in items])
        return [kps[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def ready(self) -> str:
        return self.role.value

    def info(self) -> dict[str, Any]:
        entry = self.engines.entries[self.role]
        return {
            "loaded": self.engines.loaded[self.role],
            "card": self.model.card.to_dict(),
            "versions": dict(entry.versions),
            "stats": self.stats.snapshot(),
        }

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        engines = getattr(self, "engines", None)
        if engines is not None:
            engines.close()


@serve.deployment
class DetectorDeployment:
    """The person detector (the engine dir's, or `cfg.detector`): whole BGR image in, (M,5) boxes out."""

    def __init__(self, cfg: ServeConfig) -> None:
        from dynpose.runtime.engine_set import EngineSet

        self.engines = EngineSet.load(cfg.engine_dir, _load_options(cfg, with_detector=True), roles=[])
        if self.engines.detector is None:
            raise DynPoseError(f"engine dir {cfg.engine_dir}: no detector entry; register one or pass --detector FILE.onnx")
        self.detector = self.engines.detector

    async def detect(self, image_bgr: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(self.detector, image_bgr)

    def ready(self) -> str:
        return Role.DETECTOR.value

    def info(self) -> dict[str, Any]:
        return {"loaded": self.engines.loaded.get(Role.DETECTOR, ""), "layout": self.detector.layout}

    def __del__(self) -> None:
        engines = getattr(self, "engines", None)
        if engines is not None:
            engines.close()


def _load_options(cfg: ServeConfig, with_detector: bool) -> LoadOptions:
    return LoadOptions(cfg.backend, cfg.device, cfg.threads, detector=cfg.detector, with_detector=with_detector)


class RemoteExecutor:
    """A plan's work on the service's deployments: the router in the ingress replica (off the event loop), each
    pose model's uint8 crops, cut by the plan, sent to its deployment a max batch at a time (`serve.batch` there
    gathers the crops of concurrent requests into one model run)."""

    def __init__(
        self,
        router: Router | None,
        handles: dict[Role, DeploymentHandle],
        max_batch: int,
        on_stats: Any = lambda snap: None,
    ) -> None:
        self.router, self.handles, self.max_batch, self.on_stats = router, handles, max_batch, on_stats

    async def run(self, plan: Plan, work: Sequence[Work]) -> list[Done]:
        calls = []
        for w in work:
            if w.role is Role.ROUTER:
                calls.append(asyncio.to_thread(self._route, plan, w))
            else:
                calls += [self._remote(plan, piece) for piece in w.chunks(self.max_batch)]  # serve.batch's cap
        return list(await asyncio.gather(*calls))

    def _route(self, plan: Plan, work: Work) -> Done:
        if self.router is None:
            raise DynPoseError("the plan asks for the router, which this service has not loaded")
        return Done(work, self.router.run(plan.crop(work)))

    async def _remote(self, plan: Plan, work: Work) -> Done:
        crops = await asyncio.to_thread(plan.crop, work)
        centers, scales = plan.geometry(work.role, work.idx)
        kps, snap = await self.handles[work.role].infer.remote(CropBatch(crops, centers, scales))
        self.on_stats(snap)
        return Done(work, kps)


class _Timer:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - self.last) * 1e3, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.ms, "total": round((time.perf_counter() - self.t0) * 1e3, 3)}


def _error(status: int, message: str, retry_after_s: float | None = None, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": f"{max(1, round(retry_after_s))}"} if retry_after_s is not None else {}
    if close:  # uvicorn (Serve's proxy) closes the connection after an answer that says so
        headers["Connection"] = "close"
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a handle raises when the replica it picked is gone or the deployment cannot take the call: a 503
    (the client retries; Serve starts a replacement replica)."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


@serve.deployment
class Ingress:
    """The HTTP entry: request checks, detector call, router + policy, crops, remote pose models, post-processing."""

    def __init__(
        self, small: DeploymentHandle, large: DeploymentHandle, detector: DeploymentHandle | None, cfg: ServeConfig
    ) -> None:
        from dynpose.engines.manifest import Manifest
        from dynpose.runtime.engine_set import EngineSet, pick_entry
        from dynpose.runtime.policy import parse_policy

        self.cfg = cfg
        self.handles = {Role.SMALL: small, Role.LARGE: large}
        self.detector = detector
        manifest = Manifest.load(cfg.engine_dir, verify=True)
        # The router is opened whenever the engine dir has one, so a request may ask for a routed policy.
        roles = [Role.ROUTER] if manifest.get(Role.ROUTER) is not None else []
        self.engines = EngineSet.open(manifest, _load_options(cfg, with_detector=False), roles=roles)
        self.router = self.engines.router
        self.cards = {
            m: pick_entry(manifest, self.engines.engine_dir, m, cfg.backend, cfg.device)[0].card for m in POSE_ROLES
        }
        if self.router is not None:
            self.cards[Role.ROUTER] = self.router.card
        self.keypoint_set = self.cards[Role.LARGE].keypoint_set
        self.default_policy = parse_policy(cfg.route or manifest.route)
        self.auditor = self._auditor(cfg, manifest)
        self.batch_stats: dict[tuple[str, str], dict[str, Any]] = {}
        self.executor = RemoteExecutor(self.router, self.handles, cfg.max_batch, self._keep_stats)
        self.counts = {"requests": 0, "ok": 0, "client_errors": 0, "unavailable": 0, "internal_errors": 0, "crops": 0}
        self.uploads = UploadGuard(cfg.max_body_bytes, cfg.body_timeout_s, cfg.slow_bodies)  # slow bodies are cut
        self.drain = DrainWatch(cfg.drain_actor)  # in-flight count; refuses new requests once the service stops

    def _auditor(self, cfg: ServeConfig, manifest: Any) -> Any:
        """The live audit of this ingress replica (None without --audit); its steering swaps the default route."""
        from dynpose.runtime.audit import AuditOptions, Auditor, with_calibration

        opts = AuditOptions.of(AuditOptions(cfg.audit, cfg.audit_target))
        if opts is None:
            return None
        opts = with_calibration(opts, manifest.calibration)

        def move(policy: Any) -> None:
            self.default_policy = policy  # requests that name no route use it from now on

        return Auditor(opts, self.keypoint_set.sigmas, self.default_policy, on_move=move)

    def _keep_stats(self, snap: dict[str, Any]) -> None:
        self.batch_stats[(snap["model"], snap["replica"])] = snap

    # -- HTTP ------------------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        with self.drain.request():
            return await self._respond(request)

    async def _respond(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        self.counts["requests"] += 1
        try:
            if self.drain.draining:
                raise HttpError(503, "the service is shutting down; retry later or elsewhere", retry_after_s=1, close=True)
            want = ENDPOINTS.get(path)
            if want is None:
                raise HttpError(404, f"no endpoint {path}; use POST /v1/pose, GET /healthz, GET /v1/info, GET /v1/stats")
            if request.method != want:
                raise HttpError(405, f"{path} takes {want}, not {request.method}")
            if path == "/v1/pose":
                resp: Response = JSONResponse(await self._pose(request))
            elif path == "/healthz":
                resp = await self._healthz()
            elif path == "/v1/info":
                resp = JSONResponse(await self._info())
            else:
                resp = JSONResponse(self._stats())
            self.counts["ok"] += 1
            return resp
        except HttpError as e:
            self.counts["unavailable" if e.status == 503 else "client_errors"] += 1
            return _error(e.status, e.message, e.retry_after_s, close=e.close)
        except ClientDisconnect:
            self.counts["client_errors"] += 1
            return _error(400, "the client disconnected before the request body was read")
        except _unavailable_errors() as e:
            self.counts["unavailable"] += 1
            log.warning("503 for %s: %s", path, one_line(str(e)))
            return _error(503, f"a model replica is unavailable ({type(e).__name__}); retry", retry_after_s=1)
        except Exception as e:  # a bug: logged with its traceback here, one line to the client
            self.counts["internal_errors"] += 1
            log.exception("internal error on %s", path)
            return _error(500, f"internal error: {type(e).__name__}: {one_line(str(e))}")

    async def _pose(self, request: Request) -> dict[str, Any]:
        from dynpose.runtime.boxes import Boxes
        from dynpose.runtime.execute import audit_async, execute_async
        from dynpose.runtime.pipeline import persons_of
        from dynpose.runtime.plan import LARGE, FrameInput, make_plan

        t = _Timer()
        body = await self.uploads.read(request.stream(), request.headers)
        req = await parse_pose_request(request.scope, request.headers, request.query_params, body, self.cfg.max_boxes)
        policy = self._policy(req.route)
        t.mark("read")
        image = await asyncio.to_thread(decode_request_image, req.image, self.cfg.max_pixels)
        t.mark("decode")
        boxes = req.boxes
        if boxes is None:
            if self.detector is None:
                raise HttpError(
                    400,
                    "no boxes given and this service has no detector; send boxes [[x,y,w,h(,score)], ...], or start "
                    "it on an engine dir with a detector entry (register_detector) or with --detector FILE.onnx",
                )
            boxes = await self.detector.detect.remote(image)
            t.mark("detect")
        try:
            frame = FrameInput(image, Boxes.of(boxes, image.shape, max_boxes=self.cfg.max_boxes, where="boxes"))
        except DynPoseError as e:
            raise HttpError(400, str(e)) from None
        plan = make_plan([frame], policy, self.cards)
        result = await execute_async(plan, self.executor)
        if self.auditor is not None:
            audit_async(plan, self.executor, self.auditor.sampler)  # not awaited: the answer goes out now
        t.mark("plan")
        persons = persons_of(result, self.keypoint_set.sigmas)[0]
        t.mark("post")
        self.counts["crops"] += len(frame.boxes)
        large = int((result.model == LARGE).sum())
        return {
            "persons": [p.to_dict(exact=True) for p in persons],
            "crops": {
                Role.SMALL.value: len(result.model) - large,
                Role.LARGE.value: large,
                "dropped_boxes": frame.boxes.dropped,
            },
            "route": str(policy),
            "timing_ms": t.total(),
        }

    def _policy(self, route: str | None) -> Any:
        from dynpose.runtime.policy import parse_policy

        if route is None:
            return self.default_policy
        try:
            policy = parse_policy(route)
        except DynPoseError as e:
            raise HttpError(400, str(e)) from None
        if policy.needs_router and self.router is None:
            raise HttpError(
                400,
                f"route {policy}: needs a router and this engine dir has none; use all-small, all-large, box:AREA or "
                "cascade:T",
            )
        return policy

    # -- health, info, stats ---------------------------------------------------------------------------------------
    def _downstream(self) -> dict[str, DeploymentHandle]:
        handles = {r.value: h for r, h in self.handles.items()}
        return {**handles, **({Role.DETECTOR.value: self.detector} if self.detector is not None else {})}

    async def _healthz(self) -> Response:
        handles = self._downstream()
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in handles.values())), timeout=10)
        except Exception as e:
            return _error(503, f"not every deployment is up ({type(e).__name__}: {one_line(str(e))})", retry_after_s=1)
        return JSONResponse({"status": "ok", "deployments": ["ingress", *handles]})

    async def _info(self) -> dict[str, Any]:
        import onnxruntime
        import ray

        import dynpose

        handles = self._downstream()
        infos = dict(zip(handles, await asyncio.gather(*(h.info.remote() for h in handles.values())), strict=True))
        models = {k: v["loaded"] for k, v in infos.items()}
        if self.router is not None:
            models[Role.ROUTER.value] = self.engines.loaded[Role.ROUTER]
        cards = {k: v["card"] for k, v in infos.items() if "card" in v}
        if self.router is not None:
            cards[Role.ROUTER.value] = self.router.card.to_dict()
        cfg = self.cfg
        return {
            "engine_dir": cfg.engine_dir,
            "backend": cfg.backend,
            "device": cfg.device,
            "route": str(self.default_policy),
            "flip": cfg.flip,
            "models": models,
            "cards": cards,
            "versions": {
                "dynpose": dynpose.__version__,
                "ray": ray.__version__,
                "onnxruntime": onnxruntime.__version__,
                "manifest": {k: v["versions"] for k, v in infos.items() if "versions" in v},
            },
            "replicas": {k: str(v) for k, v in cfg.replicas.items() if k != Role.DETECTOR or self.detector is not None},
            "replicas_running": await asyncio.to_thread(_running_replicas, cfg.app_name),  # a blocking call
            "batching": {"max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms},
            "limits": {"max_body_mb": cfg.max_body_mb, "max_pixels": cfg.max_pixels, "max_boxes": cfg.max_boxes},
        }

    def _stats(self) -> dict[str, Any]:
        """Requests this ingress replica answered, the pose replicas' batches (the latest totals each replica
        reported with its answers; a replica that died keeps its last totals; audit crops included), this
        replica's live audit (null without --audit), and its request bodies arriving now and cut as too slow."""
        models: dict[str, dict[str, Any]] = {}
        for m in POSE_ROLES:
            snaps = [s for (model, _), s in sorted(self.batch_stats.items()) if model == m]
            agg: dict[str, Any] = {"batches": 0, "crops": 0, "calls": 0, "crops_hist": {}, "calls_hist": {}}
            for s in snaps:
                for k in ("batches", "crops", "calls"):
                    agg[k] += s[k]
                for k in ("crops_hist", "calls_hist"):
                    for size, count in s[k].items():
                        agg[k][str(size)] = agg[k].get(str(size), 0) + count
            agg["mean_crops_per_batch"] = round(agg["crops"] / agg["batches"], 3) if agg["batches"] else None
            agg["replicas"] = [{k: s[k] for k in ("replica", "actor", "batches", "crops")} for s in snaps]
            models[m.value] = agg
        audit = self.auditor.snapshot() if self.auditor is not None else None
        return {"requests": dict(self.counts), "models": models, "audit": audit, "uploads": self.uploads.stats()}

    def __del__(self) -> None:
        engines = getattr(self, "engines", None)
        if engines is not None:
            engines.close()


def _running_replicas(app_name: str) -> dict[str, int] | None:
    """Running replicas per deployment, from Serve's status (None when the controller cannot be asked)."""
    try:
        app = serve.status().applications[app_name]
        # keys are ReplicaState members, or their plain strings once the status went through JSON
        states = {name: d.replica_states for name, d in app.deployments.items()}
        return {name: sum(n for s, n in st.items() if getattr(s, "value", s) == "RUNNING") for name, st in states.items()}
    except Exception as e:  # status is a nicety for /v1/info; never fail the request over it
        log.warning("serve.status(): %s", one_line(str(e)) or type(e).__name__)
        return None


def build_app(cfg: ServeConfig) -> Any:
    """The bound application (`serve.run(build_app(cfg))`): ingress, small, large and (when there is one) detector,
    each with its own replica count, Ray resources and graceful-shutdown settings."""
    actor: dict[str, Any] = {"num_cpus": cfg.replica_cpus}
    model_actor = {**actor, **({"num_gpus": cfg.replica_gpus} if cfg.replica_gpus > 0 else {})}
    common: dict[str, Any] = {
        "graceful_shutdown_timeout_s": 30.0,  # in-flight requests finish when a replica is stopped or scaled down
        "graceful_shutdown_wait_loop_s": 0.5,
        "max_constructor_retry_count": 3,  # a replica that cannot open its model fails the deploy fast
    }
    pose_ongoing = max(2 * cfg.max_batch, 8)  # room for the next batch to queue while one runs
    pose = {
        m: PoseModelDeployment.options(  # type: ignore[attr-defined]
            name=m.value,
            max_ongoing_requests=pose_ongoing,
            ray_actor_options=model_actor,
            **cfg.replicas[m].options(target_ongoing=cfg.max_batch),
            **common,
        ).bind(m, cfg)
        for m in POSE_ROLES
    }
    detector = None
    if has_detector(cfg):
        detector = DetectorDeployment.options(  # type: ignore[attr-defined]
            name=Role.DETECTOR.value,
            max_ongoing_requests=8,
            ray_actor_options=model_actor,
            **cfg.replicas[Role.DETECTOR].options(2),
            **common,
        ).bind(cfg)
    return Ingress.options(  # type: ignore[attr-defined]
        name="ingress",
        max_ongoing_requests=cfg.max_ongoing,
        ray_actor_options=model_actor,  # the router runs here
        **cfg.replicas["ingress"].options(target_ongoing=max(1, cfg.max_ongoing // 2)),
        **common,
    ).bind(pose[Role.SMALL], pose[Role.LARGE], detector, cfg)
