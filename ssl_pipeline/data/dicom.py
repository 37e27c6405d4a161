"""DICOM files (`.dcm`) as images, through pydicom (optional: `pip install 'ssl_pipeline[dicom]'`).

Wherever image files are read (image_folder, csv), a `.dcm` file is decoded by pydicom and
turned into an 8-bit image in three steps:

1. Modality values: the stored pixels times `RescaleSlope` plus `RescaleIntercept` (both from
   the header, 1 and 0 when absent), e.g. Hounsfield units for CT.
2. Window: the header's first `WindowCenter` / `WindowWidth` when present (what the modality
   chose for viewing), else the image's own minimum to maximum; values map linearly to 0..255
   and are clipped to the window (DICOM PS3.3 C.11.2.1.2's linear function, simplified to
   center +- width / 2).
3. `MONOCHROME1` (white is low) is inverted so that white is high, as in MONOCHROME2.

RGB DICOMs (`PhotometricInterpretation` RGB, 8 bits) are used as stored. Multi-frame files
(volumes, cine) are refused: one file must be one 2-D image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ssl_pipeline.errors import SSLPipelineError

EXTENSIONS = (".dcm", ".dicom")


def is_dicom(path: str | Path) -> bool:
    return Path(path).suffix.lower() in EXTENSIONS


def read_dicom(path: str | Path) -> Image.Image:
    """The file as an 8-bit PIL image (L, or RGB for color DICOMs); OSError when unreadable."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise SSLPipelineError(
            f"{path} is a DICOM file; reading DICOM needs pydicom: "
            "pip install 'ssl_pipeline[dicom]' (or pip install pydicom)"
        ) from None
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError, KeyError,
            NotImplementedError, EOFError) as error:
        raise OSError(f"not a readable DICOM image ({type(error).__name__}: {error})") from error
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise OSError(f"a multi-frame DICOM ({ds.NumberOfFrames} frames); give one 2-D image "
                      "per file")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        return Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    if pixels.ndim != 2:
        raise OSError(f"pixel data of shape {pixels.shape}, not a 2-D grayscale image")
    return Image.fromarray(to_8bit(ds, pixels), mode="L")


def to_8bit(ds, pixels: np.ndarray) -> np.ndarray:
    """Rescale, window and (for MONOCHROME1) invert, as the module docstring says."""
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    values = pixels.astype(np.float64) * slope + intercept
    center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width > 0:
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low)
    out = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _first(value) -> float | None:
    """A DICOM number or the first of a multi-valued one."""
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None
