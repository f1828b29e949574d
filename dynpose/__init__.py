"""dynpose: deploy DynPose (router + small + large top-down pose models) from PyTorch to fast inference."""

from typing import TYPE_CHECKING

from dynpose.errors import DynPoseError

if TYPE_CHECKING:
    from dynpose.runtime.pipeline import PersonPose, Pipeline

__version__ = "0.1.0"
__all__ = ["DynPoseError", "Pipeline", "PersonPose", "__version__"]


def __getattr__(name: str) -> object:  # lazy, so `import dynpose` stays light (no cv2, onnxruntime)
    if name in ("Pipeline", "PersonPose"):
        from dynpose.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dynpose' has no attribute {name!r}")
