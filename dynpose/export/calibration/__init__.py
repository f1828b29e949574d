"""INT8 calibration: real person crop sets (runtime preprocessing) and Q/DQ quantization with a sensitivity search
(`quantize`; the search's steps in `search`). Judged with `dynpose.export.judges`; imports nothing of export."""

from dynpose.export.calibration.crops import CalibSpec, CropSet, Source, build_crop_set

__all__ = ["CalibSpec", "CropSet", "Source", "build_crop_set"]
