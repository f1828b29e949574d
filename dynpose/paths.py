"""Where dynpose keeps what it makes for the user outside their working folders: `$DYNPOSE_HOME`, by default
`~/.cache/dynpose` (downloaded checkpoints under `checkpoints/`, the demo's engine dir under `demo/`)."""

from __future__ import annotations

import os
from pathlib import Path


def dynpose_home() -> Path:
    """`$DYNPOSE_HOME` (when set and not empty), else `~/.cache/dynpose`."""
    home = os.environ.get("DYNPOSE_HOME") or os.path.join("~", ".cache", "dynpose")
    return Path(home).expanduser()
