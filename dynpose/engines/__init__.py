"""Engine directory: the manifest and (with tensorrt installed) engine builds."""

from dynpose.engines.manifest import Entry, Manifest

__all__ = ["Entry", "Manifest"]
