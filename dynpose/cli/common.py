"""What every CLI shares: one-line errors with a non-zero exit for user mistakes, and one logging setup.

Library code logs with `logging.getLogger(__name__)` under the `dynpose` logger and never touches the root logger;
a CLI attaches one rich handler to `dynpose` (stderr), so progress notes and warnings read the same in every
command and a host application embedding the library keeps control of its own logging.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from dynpose.errors import DynPoseError

F = TypeVar("F", bound=Callable[..., Any])


def version_option(fn: F) -> F:
    """`--version` on every command: the command's name and dynpose's version (`dynpose.__version__`, the one
    pyproject.toml carries), read from the code that runs, not from an installed distribution's metadata."""
    from dynpose import __version__

    return click.version_option(__version__, "--version", message="%(prog)s (dynpose %(version)s)")(fn)


def user_errors(fn: F) -> F:
    """Turn a `DynPoseError` into `error: <message>` on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DynPoseError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


class _CliHandler(logging.Handler):
    """Prints `dynpose` log records on stderr through rich, in the CLIs' own style: INFO as the bare message,
    WARNING as `warning: ...` (yellow on a terminal), ERROR as `error: ...`; one line each, never wrapped."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        try:
            msg = escape(self.format(record))
            if record.levelno >= logging.ERROR:
                msg = f"[red]error:[/] {msg}"
            elif record.levelno >= logging.WARNING:
                msg = f"[yellow]warning:[/] {msg}"
            self.console.print(msg, soft_wrap=True)
        except Exception:  # a logging failure must never end a run
            self.handleError(record)


def setup_logging(quiet: bool = False) -> logging.Logger:
    """Send the `dynpose` loggers to stderr (`_CliHandler`): INFO and up (WARNING and up when `quiet`).
    Idempotent: a second call only changes the level."""
    logger = logging.getLogger("dynpose")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _CliHandler) for h in logger.handlers):
        logger.addHandler(_CliHandler())
        logger.propagate = False  # the host's root handlers would print every line twice
    return logger


def check_threads(threads: int | None, flag: str = "--threads") -> int | None:
    """`--threads N`: CPU cores dynpose may use (the same meaning in every command); see `resolve_threads`."""
    from dynpose.runtime.engine_set import resolve_threads

    return resolve_threads(threads, flag)


def check_finite(flag: str, value: float | None, lo: float | None = None, hi: float | None = None) -> float | None:
    """A numeric flag must be a finite number (NaN compares false with every bound) within [lo, hi]."""
    if value is None:
        return None
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise DynPoseError(f"{flag} {value}: must be a finite number{bounds}")
    return value


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block: the command's KeyboardInterrupt path runs (keep what was done,
    remove temporary files) instead of the process dying with half-written files beside its outputs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
