"""OpenVINO on this machine: the import (one line naming the extra when it is missing), the CPU's instruction set and
what OpenVINO can run on it, and the check that an IR exported elsewhere fits here.

An OpenVINO IR itself is portable, but what dynpose chose for it is not: the precision (bf16 runs only where the CPU
has AVX512_BF16 or AMX; `--precision auto` kept whatever was fastest on the export machine), the layers kept in f32
because their bf16 kernels were slow there, and the compiled-model cache. So an entry records OpenVINO's version and
the CPU's instruction set, and `check_ir_metadata` refuses a mismatch with one line, as the TensorRT plan check does.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError

INSTALL_HINT = "OpenVINO is not installed: pip install 'dynpose[openvino]' (or use --backend ort / --format onnx)"
REEXPORT = "re-export it here with dynpose-export --format openvino"

# dynpose precision -> OpenVINO's INFERENCE_PRECISION_HINT. int8 runs the layers it keeps in float in f32: the
# precision mix its accuracy gate judged (its quantized layers are int8 whatever the hint says).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# The OPTIMIZATION_CAPABILITIES entry a float precision needs on the CPU (OpenVINO lists BF16 only where the CPU
# has AVX512_BF16 or AMX, FP16 where it has AVX512_FP16 / AMX-FP16 or on ARM).
NEEDS_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}

# oneDNN's names for x86 instruction-set levels (what OpenVINO's CPU kernels are chosen by), best first, with the
# /proc/cpuinfo flags each needs.
_X86_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avx512_core_amx_fp16", ("amx_fp16", "amx_bf16", "amx_int8", "avx512_fp16")),
    ("avx512_core_amx", ("amx_bf16", "amx_int8", "avx512_bf16")),
    ("avx512_core_fp16", ("avx512_fp16", "avx512_bf16", "avx512_vnni")),
    ("avx512_core_bf16", ("avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core_vnni", ("avx512_vnni", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core", ("avx512bw", "avx512vl", "avx512dq")),
    ("avx2_vnni", ("avx_vnni", "avx2", "fma")),
    ("avx2", ("avx2", "fma")),
    ("sse41", ("sse4_1",)),
)


def import_openvino() -> Any:
    """The `openvino` module, or the one-line install hint as a DynPoseError."""
    try:
        import openvino as ov
    except ImportError:
        raise DynPoseError(INSTALL_HINT) from None
    return ov


def openvino_available() -> tuple[bool, str]:
    """(True, 'openvino X on <cpu> (<isa>)') when IRs can be made and run here; else (False, why)."""
    try:
        info = cpu_info()
    except DynPoseError as e:
        return False, str(e)
    return True, f"openvino {info.version} on {info.name} ({info.isa})"


@dataclass(frozen=True)
class CpuInfo:
    """What an OpenVINO IR's choices depend on: OpenVINO's version, the CPU's instruction-set level (oneDNN's name),
    its name, and OpenVINO's OPTIMIZATION_CAPABILITIES for it (BF16, FP16, INT8, ...)."""

    version: str
    isa: str
    name: str
    capabilities: tuple[str, ...]

    @property
    def release(self) -> str:
        """'2026.4.1' of '2026.4.1-22982-e213a147257-releases/2026/4': the builds of one release run the same IR."""
        return release_of(self.version)

    def supports(self, precision: str) -> bool:
        need = NEEDS_CAPABILITY.get(precision)
        return need is None or need in self.capabilities

    def metadata(self) -> dict[str, Any]:
        """The part of a manifest entry's `openvino` record that describes the export machine."""
        return {"openvino_version": self.version, "isa": self.isa, "cpu": self.name, "capabilities": list(self.capabilities)}


def release_of(version: str) -> str:
    m = re.match(r"\d+(\.\d+)*", str(version))
    return m.group(0) if m else str(version)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def isa_level(machine: str, flags: set[str], capabilities: tuple[str, ...]) -> str:
    """The instruction-set level: on x86 with /proc/cpuinfo the best oneDNN level whose flags are all there;
    elsewhere (ARM, macOS) the architecture and OpenVINO's float capabilities, e.g. 'arm64+FP16'."""
    if flags:
        for name, need in _X86_LEVELS:
            if all(f in flags for f in need):
                return name
    floats = "+".join(c for c in capabilities if c in ("BF16", "FP16"))
    return f"{machine.lower()}{'+' + floats if floats else ''}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's `CpuInfo` (asked once per process)."""
    ov = import_openvino()
    core = ov.Core()
    if "CPU" not in core.available_devices:
        raise DynPoseError(f"OpenVINO {ov.__version__} sees no CPU device here (devices: {core.available_devices})")
    caps = tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    name = str(core.get_property("CPU", "FULL_DEVICE_NAME")).strip()
    return CpuInfo(str(ov.__version__), isa_level(platform.machine(), _cpu_flags(), caps), name, caps)


def require_precision(precision: str, info: CpuInfo) -> None:
    """Refuse a float precision this CPU has no instructions for (bf16 without AVX512_BF16/AMX, fp16 without
    AVX512_FP16/AMX-FP16), in one line: OpenVINO would otherwise emulate it, slower than f32."""
    if not info.supports(precision):
        have = ", ".join(c for c in info.capabilities if c in ("BF16", "FP16", "FP32", "INT8")) or "none"
        raise DynPoseError(
            f"--precision {precision}: this CPU ({info.name}, {info.isa}) has no {NEEDS_CAPABILITY[precision]} "
            f"instructions (OpenVINO reports {have}); use --precision fp32, int8 or auto"
        )


def check_ir_metadata(meta: dict[str, Any] | None, info: CpuInfo, where: str) -> None:
    """Refuse an IR exported with another OpenVINO release or for another instruction set: its precision and the
    layers it keeps in f32 were chosen (and timed) for that machine."""
    if not meta:
        raise DynPoseError(f"{where}: the manifest entry has no 'openvino' export metadata; {REEXPORT}")
    built_v = str(meta.get("openvino_version", "?"))
    built_isa = str(meta.get("isa", "?"))
    if release_of(built_v) != info.release or built_isa != info.isa:
        built_cpu = f" ({meta['cpu']})" if meta.get("cpu") else ""
        raise DynPoseError(
            f"{where}: exported with OpenVINO {release_of(built_v)} for {built_isa}{built_cpu}; this machine has "
            f"OpenVINO {info.release} and {info.isa} ({info.name}); {REEXPORT}"
        )
