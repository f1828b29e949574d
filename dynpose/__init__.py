"""dynpose: deploy DynPose (router + small + large top-down pose models) from PyTorch to fast inference."""

from typing import TYPE_CHECKING

from dynpose.errors import DynPoseError
from dynpose.roles import Role

if TYPE_CHECKING:
    from dynpose.runtime.boxes import Boxes
    from dynpose.runtime.person import Decision, Person
    from dynpose.runtime.pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["Boxes", "Decision", "DynPoseError", "Person", "Pipeline", "Role", "__version__"]

# name -> module, imported on first use so `import dynpose` stays light (no cv2, onnxruntime)
_LAZY = {
    "Pipeline": "dynpose.runtime.pipeline",
    "Person": "dynpose.runtime.person",
    "Decision": "dynpose.runtime.person",
    "Boxes": "dynpose.runtime.boxes",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynpose' has no attribute {name!r}")
