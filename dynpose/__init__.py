"""dynpose: deploy DynPose (router + small + large top-down pose models) from PyTorch to fast inference."""

from dynpose.errors import DynPoseError

__version__ = "0.1.0"
__all__ = ["DynPoseError", "__version__"]
