"""`dynpose-serve`: DynPose as an HTTP service on Ray Serve (foreground until Ctrl-C / SIGTERM, then it drains),
and `dynpose-serve bench`, a load generator for a running service.

Stopping: the first SIGTERM or Ctrl-C drains (`Service.drain`: new requests get 503, the ones in flight are answered,
at most --drain-timeout-s), then Serve and Ray stop; a second one during the drain stops at once. Ctrl-C in a
terminal reaches the whole process group, Ray's own processes (raylet, GCS, agents) included: Ray starts them with
SIGINT blocked, so they stay up for the drain and go when the service shuts Ray down (tests/test_serve_local.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynpose.cli.common import check_threads, setup_logging, user_errors, version_option
from dynpose.errors import DynPoseError
from dynpose.roles import Role

if TYPE_CHECKING:
    from dynpose.serve.config import ServeConfig
    from dynpose.serve.service import Service

EPILOG = """\b
Examples:
  # one machine: a local Ray cluster, HTTP on 127.0.0.1:8000
  dynpose-serve --engine-dir engines/
  curl -F image=@photo.jpg http://127.0.0.1:8000/v1/pose
  # a Ray cluster (`ray start --head` first): 2 large replicas on GPUs, small autoscaled 1-4
  dynpose-serve --engine-dir /shared/engines --address auto --host 0.0.0.0 --device cuda \\
      --backend tensorrt --large-replicas 2 --small-replicas 1-4 --replica-gpus 0.5
  # audit 5% of the small model's answers on the large model (figures on GET /v1/stats)
  dynpose-serve --engine-dir engines/ --audit 0.05 --audit-target 0.95
  # load test a running service with COCO images and their detections
  dynpose-serve bench --url http://127.0.0.1:8000 --images coco/ --detections dets.json \\
      --concurrency 16 --requests 400

\b
Endpoints: POST /v1/pose (JSON {"image": base64, "boxes": [[x,y,w,h(,score)],...], "route": ...},
a multipart form with an `image` file, or the image itself as the body), GET /healthz, GET /v1/info,
GET /v1/stats. Replica counts take N or MIN-MAX (autoscaling). Ctrl-C or SIGTERM drains (requests in flight are
answered, new ones get 503) and stops; a second one stops at once. See docs/serving.md.
"""


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@version_option
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine dir with manifest.json (starts the service).")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--address",
    default="local",
    show_default=True,
    help="Ray cluster: local (start one here), auto, HOST:PORT or ray://HOST:10001.",
)
@click.option("--small-replicas", default="1", show_default=True, help="Small-model replicas: N, or MIN-MAX to autoscale.")
@click.option("--large-replicas", default="1", show_default=True, help="Large-model replicas: N, or MIN-MAX.")
@click.option("--detector-replicas", default="1", show_default=True, help="Detector replicas (when there is a detector).")
@click.option("--ingress-replicas", default="1", show_default=True, help="Ingress (HTTP, router, crops) replicas.")
@click.option("--max-batch", type=int, default=16, show_default=True, help="Most crops per pose-model run, across requests.")
@click.option(
    "--batch-wait-ms", type=float, default=5.0, show_default=True, help="How long a pose replica waits for a batch to fill."
)
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch", "openvino"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU cores the models may use per node (default: all).")
@click.option("--route", default=None, help="Default routing policy (default: the manifest's); a request may set its own.")
@click.option("--flip", is_flag=True, help="Flip test (average with the mirrored crop).")
@click.option(
    "--detector",
    "detector_path",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX person detector (default: the engine dir's).",
)
@click.option(
    "--max-body-mb", type=float, default=20.0, show_default=True, help="Largest request body accepted (413 above)."
)
@click.option("--max-ongoing", type=int, default=64, show_default=True, help="Concurrent requests per ingress replica.")
@click.option(
    "--body-timeout-s",
    type=float,
    default=30.0,
    show_default=True,
    help="A request body must arrive within this (408 and the connection closed otherwise; slow uploads beyond a "
    "quarter of --max-ongoing are cut sooner).",
)
@click.option(
    "--request-timeout-s",
    type=float,
    default=120.0,
    show_default=True,
    help="End-to-end limit per request in Serve's HTTP proxy (408 past it); 0: none.",
)
@click.option(
    "--drain-timeout-s",
    type=float,
    default=30.0,
    show_default=True,
    help="On Ctrl-C / SIGTERM, wait at most this long for the requests in flight.",
)
@click.option(
    "--replica-cpus", type=float, default=0.5, show_default=True, help="Ray CPUs each replica reserves (scheduling only)."
)
@click.option("--replica-gpus", type=float, default=None, help="GPU fraction per replica with --device cuda (default 0.25).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="dynpose's lines from this level; Ray's own lines (replicas, proxy, raylet) only with debug.",
)
@click.option(
    "--audit",
    type=float,
    default=0.0,
    show_default=True,
    help="Live audit: this share (0-1) of the persons answered by the small model also run on the large model after "
    "the answer is sent; the agreement is on GET /v1/stats (per ingress replica).",
)
@click.option(
    "--audit-target",
    type=float,
    default=None,
    help="With --audit: step the default route toward the large model while the agreement's interval is below this "
    "(0-1], and back once it is clearly above (docs/router.md, Audit).",
)
@click.option("--quiet", is_flag=True, help="Same as --log-level warning.")
@click.pass_context
@user_errors
def main(ctx: click.Context, **flags: Any) -> None:
    """Serve DynPose over HTTP on Ray Serve, in the foreground until Ctrl-C or SIGTERM (then it drains in-flight
    requests and shuts down)."""
    from dynpose.serve.config import check_config

    if ctx.invoked_subcommand is not None:
        return
    if flags["engine_dir"] is None:
        raise DynPoseError("--engine-dir: none given; pass the folder dynpose-export wrote (or run `dynpose-serve bench`)")
    log_level = "warning" if flags["quiet"] else flags["log_level"]
    setup_logging().setLevel(log_level.upper())
    _serve(check_config(_config(flags, log_level)), flags["host"], flags["port"], flags["address"])


def _config(f: dict[str, Any], log_level: str) -> ServeConfig:
    """The service's one configuration object, from the flags."""
    from dynpose.serve.config import ServeConfig, parse_replicas

    counts = {
        "ingress": f["ingress_replicas"],
        Role.DETECTOR.value: f["detector_replicas"],
        Role.SMALL.value: f["small_replicas"],
        Role.LARGE.value: f["large_replicas"],
    }
    gpus = f["replica_gpus"]
    return ServeConfig(
        engine_dir=str(f["engine_dir"]),
        backend=f["backend"],
        device=f["device"],
        threads=check_threads(f["threads"]),
        route=f["route"],
        flip=f["flip"],
        detector=str(f["detector_path"]) if f["detector_path"] is not None else None,
        max_batch=f["max_batch"],
        batch_wait_ms=f["batch_wait_ms"],
        max_body_mb=f["max_body_mb"],
        replicas={k: parse_replicas(v, f"--{k}-replicas") for k, v in counts.items()},
        replica_cpus=f["replica_cpus"],
        replica_gpus=(0.25 if f["device"] == "cuda" else 0.0) if gpus is None else gpus,
        max_ongoing=f["max_ongoing"],
        body_timeout_s=f["body_timeout_s"],
        request_timeout_s=f["request_timeout_s"] or None,
        drain_timeout_s=f["drain_timeout_s"],
        log_level=log_level,
        audit=f["audit"],
        audit_target=f["audit_target"],
    )


@contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT (Ctrl-C) raise KeyboardInterrupt in the main thread inside the block. Installed again at
    each block: `ray.init` puts its own SIGTERM handler in (exit without draining), and Ray's C++ core may put a
    crash handler over it while the service starts."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _drain(svc: Service, log: logging.Logger) -> None:
    """The first Ctrl-C / SIGTERM: answer what is in flight (a second one stops at once)."""
    timeout = svc.cfg.drain_timeout_s
    log.info("stopping: answering the requests in flight (at most %g s; Ctrl-C again to stop at once)", timeout)
    try:
        with _stop_signals():
            left = svc.drain()
    except KeyboardInterrupt:
        log.warning("stopping at once: requests still in flight lose their connection")
        return
    except DynPoseError as e:
        log.warning("%s", e)
        return
    if left:
        log.warning("%d request(s) still in flight after %g s (--drain-timeout-s); stopping anyway", left, timeout)
    else:
        log.info("drained: every request in flight was answered")


def _serve(cfg: ServeConfig, host: str, port: int, address: str) -> None:
    from dynpose.serve.service import Service

    log = logging.getLogger("dynpose.cli.serve")
    click.echo(f"dynpose-serve: starting on Ray ({address}); loading models ...", err=True)
    svc = None
    try:
        with _stop_signals():  # a signal while Ray starts: stop (nothing in flight yet) ...
            svc = Service.start(cfg, host=host, port=port, address=address)
        with _stop_signals():  # ... and while serving (installed again: see _stop_signals)
            click.echo(
                f"dynpose-serve: ready at {svc.url} (POST /v1/pose, GET /healthz, /v1/info, /v1/stats); Ctrl-C to stop",
                err=True,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        if svc is not None:
            _drain(svc, log)
    finally:
        if svc is not None:
            with _stop_signals():
                svc.stop(drain=False)
    click.echo("dynpose-serve: stopped", err=True)


@main.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The running service.")
@click.option("--images", required=True, type=click.Path(path_type=Path), help="A folder of images (or one image).")
@click.option(
    "--detections", type=click.Path(path_type=Path), default=None, help="COCO detections (else the detector runs)."
)
@click.option("--concurrency", type=int, default=4, show_default=True, help="Client threads, each one request at a time.")
@click.option("--requests", "n_requests", type=int, default=100, show_default=True, help="Timed requests in all.")
@click.option("--warmup", type=int, default=None, help="Untimed requests first (default: the concurrency).")
@click.option("--route", default=None, help="Routing policy sent with each request (default: the service's).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per request attempt.")
@click.option("--retries", type=int, default=5, show_default=True, help="Retries after connection errors and 503s.")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the figures as JSON (atomic)."
)
@user_errors
def bench(
    url: str,
    images: Path,
    detections: Path | None,
    concurrency: int,
    n_requests: int,
    warmup: int | None,
    route: str | None,
    timeout: float,
    retries: int,
    json_out: Path | None,
) -> None:
    """Load a running service: req/s, crops/s, p50/p95/p99 latency, errors, and the pose batches formed."""
    from dynpose.fileio import OutputGuard, write_json_atomic
    from dynpose.io.sinks import check_writable_file
    from dynpose.serve.client import Client
    from dynpose.serve.loadgen import format_report, load_items, run_load

    if json_out is not None:
        check_writable_file(json_out, "--json")  # an unwritable destination fails before the load runs
        OutputGuard.of({"--detections": detections}, sources={"--images": images}).check_file(json_out, "--json")
    items = load_items(images, detections)
    client = Client(url, timeout=timeout, retries=retries)
    if not client.healthy():
        raise DynPoseError(f"--url {url}: the service is not answering /healthz; start it with dynpose-serve --engine-dir E")
    report = run_load(client, items, concurrency, n_requests, route, concurrency if warmup is None else warmup)
    click.echo(format_report(report))
    if json_out is not None:
        write_json_atomic(json_out, report)
        click.echo(f"wrote {json_out}")
