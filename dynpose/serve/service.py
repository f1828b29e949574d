"""Start and stop the service: Ray (a new local cluster, or one joined by address), Serve's HTTP proxy, the app.

    with Service.start(check_config(ServeConfig(engine_dir="engines/")), port=8000) as svc:
        Client(svc.url).pose(image)

`stop()` drains first (`dynpose.serve.drain`): the ingress replicas refuse new requests (503, Retry-After) and the
requests already in flight are answered, for at most `cfg.drain_timeout_s`. Then, on a cluster this process
started (`address="local"`), it shuts Ray down, Serve with it; on a cluster it joined it deletes only its own app
and leaves Serve running for the cluster's other apps.

Serve's HTTP proxy is started with `cfg.request_timeout_s` (end to end, Serve answers 408 past it); request bodies
are bounded by the ingress itself (`dynpose.serve.uploads`). Options of a Serve that already runs on a joined
cluster cannot change: Serve keeps its own and warns.

Logs: the service's output is dynpose's own lines (`cfg.log_level`). Ray's driver-side loggers print errors only,
Serve's warnings, and the Ray processes' own lines (replicas, controller, proxy, raylet) stay in Ray's log folder
(`/tmp/ray/session_latest/logs` on the head node); `log_level="debug"` shows all of them here too.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.serve.config import ServeConfig

log = logging.getLogger(__name__)


class _Misleading(logging.Filter):
    """Serve's driver logs that "http_options will not be applied" whenever `serve.run` reconnects to the Serve
    that `serve.start` has just started with them: they were applied. (A real mismatch is its own warning.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def _quiet_ray(level: str) -> dict[str, Any]:
    """Ray's driver-side loggers to `level`'s share (module note); the `ray.init` arguments that go with it."""
    debug = level == "debug"
    logging.getLogger("ray").setLevel(logging.INFO if debug else logging.ERROR)
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.setLevel(logging.INFO if debug else max(logging.WARNING, logging.getLevelName(level.upper())))
    if not any(isinstance(f, _Misleading) for f in serve_logger.filters):
        serve_logger.addFilter(_Misleading())
    return {"logging_level": logging.INFO if debug else logging.ERROR, "log_to_driver": debug}


def _init_ray(address: str, num_cpus: int | None, log_level: str = "info") -> tuple[bool, bool]:
    """Connect to (or start) Ray: (this call started the cluster, this call connected). A process already connected
    (a test, a notebook) keeps its connection and its cluster."""
    import ray

    if ray.is_initialized():
        return False, False
    quiet = _quiet_ray(log_level)
    if address != "local" and num_cpus is not None:
        raise DynPoseError("num_cpus applies to a local cluster only (--address local)")
    with _keep_sigterm_handler():
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
            return True, True
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as e:
            why = str(e).strip().splitlines()[0] if str(e) else e
            raise DynPoseError(
                f"--address {address}: cannot join a Ray cluster there ({why}); "
                "start one with `ray start --head` or use --address local"
            ) from None
    return False, True


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """`ray.init` replaces SIGTERM's handler with its own (exit at once); a handler the caller installed (the CLI's,
    which drains) is put back. With none (the default action), Ray's stays: it exits through Ray's clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _why(text: str) -> str | None:
    """The line of a replica's traceback that says why (a DynPoseError's message, else the last error line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "DynPoseError: " in ln:
            return ln.rpartition("DynPoseError: ")[2]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return errors[-1] if errors else None


def _deploy_error(e: Exception, app_name: str) -> str:
    """Why the deploy failed: Serve's exception only names the deployments, their status carries the replica's
    traceback."""
    from ray import serve

    try:
        app = serve.status().applications[app_name]
        found = [(name, _why(d.message)) for name, d in app.deployments.items() if d.message]
        reasons = [f"{why} (deployment {name})" for name, why in found if why]
        if reasons:
            return reasons[0]
    except Exception:  # the status is only a better message; fall back to Serve's own
        pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass
class Service:
    """A running service: its URL, and what it must shut down when stopped."""

    cfg: ServeConfig
    host: str
    port: int
    owns_ray: bool  # this process started the cluster: stop() shuts Serve and Ray down
    connected: bool = True  # this process connected to Ray for the service: stop() disconnects
    control: Any = None  # the drain's control actor (`dynpose.serve.drain`)
    drained: bool = False
    stopped: bool = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def start(
        cls,
        cfg: ServeConfig,
        host: str = "127.0.0.1",
        port: int = 8000,
        address: str = "local",
        num_cpus: int | None = None,
    ) -> Service:
        """Start Ray (or join `address`: auto, HOST:PORT, ray://HOST:10001), Serve's HTTP proxy on host:port, and
        the app; returns once every deployment is up. `cfg` should come from `check_config`."""
        from ray import serve

        from dynpose.serve.app import build_app
        from dynpose.serve.drain import start_control

        owns_ray, connected = _init_ray(address, num_cpus, cfg.log_level)
        svc = cls(cfg, host, port, owns_ray, connected)
        try:
            svc.control, name = start_control(cfg.app_name)
            svc.cfg = cfg = cfg.with_(drain_actor=name)
            http = {"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s}
            serve.start(http_options=http)
            try:
                serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
            except RuntimeError as e:
                raise DynPoseError(f"the service failed to start: {_deploy_error(e, cfg.app_name)}") from None
        except BaseException:
            svc.stop(drain=False)
            raise
        log.info("dynpose service up at %s", svc.url)
        return svc

    def drain(self, timeout_s: float | None = None) -> int:
        """Refuse new requests and wait for the ones in flight (at most `timeout_s`, default `cfg.drain_timeout_s`);
        returns how many were still in flight at the end (0: every one was answered)."""
        from dynpose.serve.drain import drain_requests

        if self.drained or self.control is None:
            return 0
        self.drained = True
        try:
            return drain_requests(self.control, self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        except Exception as e:  # the control actor is gone (its node died): say so; stopping goes on without it
            why = str(e).strip().splitlines()[0] if str(e) else type(e).__name__
            raise DynPoseError(f"cannot drain ({why}); requests in flight may lose their connection") from None

    def stop(self, drain: bool = True) -> None:
        """Drain (unless `drain=False` or already drained), then stop (see the module note); idempotent. Ray is shut
        down even when the drain is interrupted (Ctrl-C), which then propagates."""
        if self.stopped:
            return
        try:
            if drain:
                self._drain_or_warn()
        finally:
            self.stopped = True
            self._shutdown()

    def _drain_or_warn(self) -> None:
        try:
            left = self.drain()
        except DynPoseError as e:
            log.warning("%s", e)
            return
        if left:
            log.warning("%d request(s) still in flight after %g s; stopping anyway", left, self.cfg.drain_timeout_s)

    def _shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            # A cluster this process started goes with `ray.shutdown()` below, Serve included (after the drain nothing
            # is in flight); `serve.shutdown()` first would only add Ray's misleading "Task
            # ServeController.graceful_shutdown failed ... will be retried" line to the output.
            if not self.owns_ray:
                serve.delete(self.cfg.app_name)
        except Exception as e:  # shutting down must not hide why we stopped; say it and go on
            log.warning("stopping Serve: %s", str(e).strip().splitlines()[0] if str(e) else type(e).__name__)
        finally:
            if self.connected:
                ray.shutdown()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def describe(svc: Service) -> dict[str, Any]:
    """One line's worth of what runs (for the CLI's banner)."""
    cfg = svc.cfg
    return {
        "url": svc.url,
        "engine_dir": cfg.engine_dir,
        "route": cfg.route,
        "replicas": {k: str(v) for k, v in cfg.replicas.items()},
        "max_batch": cfg.max_batch,
        "batch_wait_ms": cfg.batch_wait_ms,
    }
