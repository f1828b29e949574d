"""Checkpoint loading for the zoo models: local files, http(s) downloads into a cache, and card aliases.

Loading is strict: after the format's prefixes are removed, the checkpoint must hold exactly the model's tensors
with the model's shapes (only `num_batches_tracked` buffers may be missing; old releases lack them). Half-loaded
models give plausible-looking but wrong keypoints, so any other difference is an error that names the tensors.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, sha256_file
from dynpose.models import layouts
from dynpose.models.card import COLOR_ORDERS, ModelCard
from dynpose.paths import dynpose_home
from dynpose.roles import Role

FORMATS = ("official", "mmpose1", "mmpose0", "dynpose_router")
# Card alias whose colour order applies when a local file is recognised as this format.
_FORMAT_ALIAS = {"official": "official", "mmpose1": "mmpose", "mmpose0": "mmpose", "dynpose_router": "dynpose"}
# MMPose model-zoo names end in `-<first 8 hex of sha256>_<yyyymmdd>.pth`.
_MMPOSE_HASH = re.compile(r"-([0-9a-f]{8})_\d{8}\.[A-Za-z.]+$")
# torch.hub style: `-<hex prefix>.pth`. Needs a letter so dates/epoch numbers are not taken for hashes.
_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z.]+$")


@dataclass
class LoadedCheckpoint:
    """What `load_weights` loaded and how it read it."""

    format: str  # one of FORMATS
    path: Path
    sha256: str
    source: str  # what the caller passed (path, URL or alias)
    url: str | None = None
    alias: str | None = None
    wrapper: str | None = None  # "state_dict" / "model" when the tensors sat under that key
    data_parallel: bool = False  # `module.` prefixes were stripped
    missing_num_batches_tracked: int = 0
    ignored: list[str] = field(default_factory=list)  # e.g. MMPose `data_preprocessor.*` buffers
    num_tensors: int = 0
    color_order: str = "rgb"


# -- cache and downloads ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where downloaded checkpoints live: `$DYNPOSE_HOME/checkpoints` (default `~/.cache/dynpose/checkpoints`)."""
    return dynpose_home() / "checkpoints"


def sha256_prefix_from_name(name: str) -> str | None:
    """The sha256 prefix a file name promises (MMPose `-81c58e40_20220909.pth`, hub `-0676ba61.pth`), or None."""
    m = _MMPOSE_HASH.search(name)
    if m:
        return m.group(1)
    m = _HUB_HASH.search(name)
    if m and re.search("[a-f]", m.group(1)):
        return m.group(1)
    return None


def _cache_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name or name in (".", "..") or not re.fullmatch(r"[\w.+-]+", name):
        name = "checkpoint.pth"
    # A name without a content hash (e.g. `backbone.pth`) could come from many places: key it by the URL too.
    if sha256_prefix_from_name(name) is None:
        name = f"{hashlib.sha256(url.encode()).hexdigest()[:8]}_{name}"
    return name


def _check_sha(digest: str, expected: str | None, what: str, url: str) -> None:
    if expected and not digest.startswith(expected.lower()):
        raise DynPoseError(
            f"{what} from {url}: sha256 {digest[:16]}... does not match the expected {expected[:16]}...; the "
            "download is corrupt or not the published file (try again, or download it elsewhere and pass its path)"
        )


def download(url: str, sha256: str | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch `url` into `cache_dir()` (atomic rename, sha256 check) and return the local path.

    The expected hash is `sha256` (full or prefix) or else the prefix the file name carries. A file already in the
    cache is used without any network access.
    """
    return _download(url, sha256, progress, timeout)[0]


def _download(url: str, sha256: str | None, progress: bool, timeout: float) -> tuple[Path, str]:
    dest = cache_dir() / _cache_name(url)
    expected = sha256 or sha256_prefix_from_name(dest.name)
    if dest.is_file():
        digest = sha256_file(dest)
        if expected and not digest.startswith(expected.lower()):
            raise DynPoseError(
                f"cached checkpoint {dest} has sha256 {digest[:16]}..., expected {expected[:16]}...; delete it and "
                "run again to download it afresh"
            )
        return dest, digest

    request = urllib.request.Request(url, headers={"User-Agent": "dynpose"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, atomic_path(dest) as tmp:
            from tqdm import tqdm

            total = int(resp.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            size = 0
            with (
                open(tmp, "wb") as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=None if progress else True,
                ) as bar,
            ):
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            if total is not None and size != total:
                raise DynPoseError(f"download of {url} stopped after {size} of {total} bytes; run again")
            digest = h.hexdigest()
            # Raising here makes atomic_path delete the temp file: nothing unverified reaches the cache.
            _check_sha(digest, expected, "checkpoint", url)
    except urllib.error.HTTPError as e:
        raise DynPoseError(
            f"cannot download {url}: HTTP {e.code} {e.reason}; check the URL, or download the file elsewhere and "
            "pass its local path"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DynPoseError(
            f"cannot download {url} ({reason}); if this machine is offline, download the file on another machine "
            "and pass its local path instead"
        ) from None
    return dest, digest


# -- reading checkpoint files -------------------------------------------------------------------------------------
def _numpy_data_globals() -> list[Any]:
    """numpy arrays/scalars as pure data for the weights-only unpickler.

    MMPose/mmengine checkpoints keep numpy arrays in `meta` (dataset sigmas, colours). Rebuilding an ndarray or a
    numpy scalar runs no user code, so allowing these few globals keeps such files loadable without trust_pickle.
    Both numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) spellings appear in real files.
    """
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    scalar = np.float64(0).__reduce__()[0]
    out: list[Any] = [np.ndarray, np.dtype]
    # numpy >= 1.25 gives each dtype its own class (Float32DType...), which the unpickler must be allowed to build.
    out += sorted({type(np.dtype(code)) for code in np.typecodes["All"]} - {np.dtype}, key=str)
    for core in ("numpy.core", "numpy._core"):
        out += [(reconstruct, f"{core}.multiarray._reconstruct"), (scalar, f"{core}.multiarray.scalar")]
    return out


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        if not trust_pickle and m:
            raise DynPoseError(
                f"checkpoint {path} needs pickle code execution to load (it contains {m.group(1)}); load it with "
                "trust_pickle=True (CLI: --trust-checkpoint) only if you trust where the file came from"
            ) from None
        raise DynPoseError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({_unpickler_reason(e)}); it is damaged or not a "
            "torch file: download or copy it again"
        ) from None
    except Exception as e:  # a damaged or foreign file fails deep inside the unpickler with any error type
        raise DynPoseError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); it is damaged or not a "
            "torch file: download or copy it again"
        ) from None


def _unpickler_reason(e: BaseException) -> str:
    """The unpickler's own reason, without torch's advice to load with weights_only=False: for a damaged file that
    advice is wrong (it would fail too) and for a hostile one dangerous; trust is what --trust-checkpoint is for."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(e), flags=re.S)
    reason = " ".join((m.group(1) if m else str(e).splitlines()[-1] if str(e).strip() else type(e).__name__).split())
    return reason if reason and "weights_only" not in reason else "unpickling failed"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if isinstance(obj, nn.Module):  # a pickled whole model (only reachable with trust_pickle)
        return obj.state_dict(), "module object"
    if _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict(), key
            if isinstance(inner, dict) and inner:
                bad = [k for k, v in inner.items() if not isinstance(v, torch.Tensor)]
                if bad:
                    raise DynPoseError(f"checkpoint {path}: '{key}' holds non-tensor entries ({', '.join(bad[:3])})")
                return inner, key
    kind = f"dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
    raise DynPoseError(
        f"checkpoint {path}: no state_dict found ({kind}); expected a state_dict or a dict with 'state_dict' / 'model'"
    )


StateDict = dict[str, torch.Tensor]


def strip_wrappers(sd: StateDict) -> tuple[StateDict, bool, list[str]]:
    """Remove DataParallel `module.` prefixes and MMPose 1.x `data_preprocessor.*` buffers (MMPose drops them on load
    too). Returns (state_dict, data_parallel, ignored keys)."""
    data_parallel = any(k.startswith("module.") for k in sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    ignored = [k for k in sd if k.startswith("data_preprocessor.")]
    return {k: v for k, v in sd.items() if not k.startswith("data_preprocessor.")}, data_parallel, ignored


def convert_state_dict(sd: StateDict, router: bool = False) -> tuple[StateDict, str, bool, list[str]]:
    """Map a checkpoint's names onto the zoo's (official) names.

    Returns (state_dict, format, data_parallel, ignored keys). Format detection: `keypoint_head.` -> MMPose 0.x,
    `head.` -> MMPose 1.x, everything under `backbone.` -> the DynPose router release (or a head-less MMPose file,
    which the strict check then reports), otherwise the official plain layout.
    """
    sd, data_parallel, ignored = strip_wrappers(sd)
    keys = list(sd)
    prefixes: tuple[str, ...]
    if any(k.startswith("keypoint_head.") for k in keys):
        fmt, prefixes = "mmpose0", ("backbone.", "keypoint_head.")
    elif any(k.startswith("head.") for k in keys):
        fmt, prefixes = "mmpose1", ("backbone.", "head.")
    elif keys and all(k.startswith("backbone.") for k in keys):
        fmt, prefixes = ("dynpose_router" if router else "mmpose1"), ("backbone.",)
    else:
        fmt, prefixes = "official", ()
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out, fmt, data_parallel, ignored


def _mismatch_message(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str:
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    wrong = [
        f"{k} (checkpoint {list(sd[k].shape)}, model {list(v.shape)})"
        for k, v in model_sd.items()
        if k in sd and sd[k].shape != v.shape
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {few(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with the wrong shape: {few(wrong)}")
    return "; ".join(parts)


def _found(sd: StateDict, router: bool) -> str:
    """What a refused checkpoint is, for its message: the zoo model (and format) it fits, if any."""
    found = layouts.identify(sd, lambda s: convert_state_dict(s, router=router)[0])
    return f"the {found} layout" if found else f"a layout of no zoo model ({len(sd)} tensors)"


def _to_model_names(model: nn.Module, sd: StateDict, path: Path) -> tuple[StateDict, str, bool, list[str]]:
    """A checkpoint's tensors -> the model's names, checked strictly; (state_dict, format, data_parallel, ignored).

    A model that reads checkpoint formats of its own (`layouts.ReadsCheckpointFormats`: RTMPose, ViTPose) is
    checked in the file's own format, so a refusal names tensors as the file does; the others go through the
    prefix rules of `convert_state_dict` (and an `adapt_state_dict` method, SimDR's second naming). A refusal is one
    line: the found and the expected layout and the first tensor where they differ."""
    card: ModelCard | None = getattr(model, "card", None)
    name = card.name if card is not None else type(model).__name__
    hint = f" (known sources: {', '.join(card.sources)})" if card is not None and card.sources else ""
    router = card is not None and card.task == Role.ROUTER
    if isinstance(model, layouts.ReadsCheckpointFormats):
        plain, data_parallel, ignored = strip_wrappers(sd)
        formats = model.checkpoint_formats()
        fmt = layouts.best_format(formats, layouts.layout_of(plain))
        first = layouts.first_difference(formats[fmt], layouts.layout_of(plain))
        if first is not None:
            raise DynPoseError(
                f"checkpoint {path} holds {_found(sd, router)}, but {name} expects its {fmt} layout: first differing "
                f"tensor {first}; use a {name} checkpoint{hint}"
            )
        return model.from_checkpoint(plain, fmt), fmt, data_parallel, ignored
    out, fmt, data_parallel, ignored = convert_state_dict(sd, router=router)
    adapt = getattr(model, "adapt_state_dict", None)  # a family released under two namings (SimDR)
    if callable(adapt):
        out = adapt(out)
    model_sd = model.state_dict()
    problems = _mismatch_message(model_sd, out)
    if problems:
        first = layouts.first_difference(layouts.layout_of(model_sd), layouts.layout_of(out))
        raise DynPoseError(
            f"checkpoint {path} (detected format {fmt}, {_found(sd, router)}) does not fit {name}: {problems}; first "
            f"differing tensor {first}; use a {name} checkpoint{hint}"
        )
    return out, fmt, data_parallel, ignored


def attach(model: nn.Module, **attrs: Any) -> nn.Module:
    """Set plain attributes (`card`, `weights_source`, `checkpoint`) on a model; nn.Module's type hints only know
    tensors and submodules as attributes, so the checker is told through setattr."""
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


# -- the public entry point ---------------------------------------------------------------------------------------
def check_source(card: ModelCard, source: str | os.PathLike) -> None:
    """Refuse, without downloading or reading anything, a weights source `_resolve` would refuse: a batch of exports
    checks every model's source before it exports the first."""
    if source == "random" or (isinstance(source, str) and source.startswith(("http://", "https://"))):
        return
    if isinstance(source, str) and source in card.sources:
        if not card.sources[source].get("url"):
            entry = card.sources[source]
            raise DynPoseError(
                f"{card.name}: the '{source}' checkpoint has no direct download link; get it from "
                f"{entry.get('manual', 'its publisher')} and pass the downloaded file's path"
            )
        return
    if not Path(source).expanduser().is_file():
        aliases = ", ".join(card.sources) if card.sources else "none"
        raise DynPoseError(
            f"{card.name}: checkpoint {source!s}: file not found; pass a checkpoint path, an http(s) URL, or a known "
            f"alias for this model ({aliases})"
        )


def _resolve(
    card: ModelCard | None, source: str | os.PathLike, progress: bool
) -> tuple[Path, str | None, str | None, str | None]:
    """-> (local path, url, alias, sha256 if already computed)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        path, digest = _download(source, None, progress, 30.0)
        return path, source, None, digest
    if isinstance(source, str) and card is not None and source in card.sources:
        entry = card.sources[source]
        if not entry.get("url"):
            raise DynPoseError(
                f"{card.name}: the '{source}' checkpoint has no direct download link; get it from "
                f"{entry.get('manual', 'its publisher')} and pass the downloaded file's path"
            )
        path, digest = _download(entry["url"], entry.get("sha256"), progress, 30.0)
        return path, entry["url"], source, digest
    path = Path(source).expanduser()
    if not path.is_file():
        aliases = ", ".join(card.sources) if card is not None and card.sources else "none"
        raise DynPoseError(
            f"checkpoint {source!s}: file not found; pass a checkpoint path, an http(s) URL, or a known alias "
            f"for this model ({aliases})"
        )
    return path, None, None, None


def load_weights(
    model: nn.Module,
    source: str | os.PathLike,
    trust_pickle: bool = False,
    *,
    color_order: str | None = None,
    progress: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint into a zoo model, strictly, and set `model.card`'s colour order for it.

    source: a local path, an http(s) URL (downloaded once into `cache_dir()`), or an alias from `model.card.sources`
    ("mmpose", "official", ...). Official, MMPose 1.x/0.x, DataParallel (`module.`) and DynPose router
    (`backbone.`) layouts are recognised, bare or under a "state_dict"/"model" key; a model with an
    `adapt_state_dict(sd) -> sd` method (SimDR) maps a second official naming of its own, and a model whose own
    names are a release's (RTMPose, ViTPose: `layouts.ReadsCheckpointFormats`) is checked in each format it reads.
    A refused file names the found and expected layout and the first differing tensor, and loads nothing.
    trust_pickle: allow checkpoints that need pickle code execution (CLI `--trust-checkpoint`); never for files
    from an untrusted source.
    color_order: override the colour order the weights expect ("rgb"/"bgr"); by default it comes from the card
    source (alias, or the one of the detected format: official SimpleBaseline = BGR, MMPose/HRNet = RGB). That source's
    "card" settings are applied too (official ViTPose: `blur_border="reflect"`, its evaluation's blur).
    """
    card: ModelCard | None = getattr(model, "card", None)
    if color_order is not None and color_order not in COLOR_ORDERS:
        raise DynPoseError(f"color_order must be one of {COLOR_ORDERS}, got {color_order!r}")
    path, url, alias, digest = _resolve(card, source, progress)
    sd, wrapper = _unwrap(_torch_load(path, trust_pickle), path)
    sd, fmt, data_parallel, ignored = _to_model_names(model, sd, path)
    missing_nbt = sum(1 for k in model.state_dict() if k not in sd)
    # Checked by _to_model_names: strict apart from num_batches_tracked, which keeps the model's own (unused in eval)
    # value. Nothing is loaded before that check, so a refused file leaves the model as it was.
    model.load_state_dict(sd, strict=False)
    entry = (card.sources.get(alias or _FORMAT_ALIAS[fmt]) if card is not None else None) or {}
    if color_order is None:
        color_order = entry.get("color_order") or (card.color_order if card is not None else "rgb")
    if card is not None:  # the source's own card settings (official ViTPose: its blur border) come with its weights
        attach(model, card=card.with_(**{**entry.get("card", {}), "color_order": color_order}))
    loaded = LoadedCheckpoint(
        format=fmt,
        path=path,
        sha256=digest or sha256_file(path),
        source=str(source),
        url=url,
        alias=alias,
        wrapper=wrapper,
        data_parallel=data_parallel,
        missing_num_batches_tracked=missing_nbt,
        ignored=ignored,
        num_tensors=len(sd),
        color_order=color_order,
    )
    attach(model, checkpoint=loaded, weights_source=str(source))
    return loaded
