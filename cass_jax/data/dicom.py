"""DICOM files and other high-bit-depth pixels to the pipeline's uint8 RGB, with DICOM windowing.

pydicom decodes the pixel data and applies the DICOM grayscale pipeline (modality LUT, VOI LUT or window);
`DecodeOptions` carries the configured window and frame into the file sources and the grain workers.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length, get_nr_frames

DICOM_EXTENSIONS = (".dcm", ".dicom")
_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Colour interpretations whose decoded array pydicom (or the JPEG / JPEG 2000 plugin) returns as RGB.
_RGB_AFTER_DECODING = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
_HELP = "Convert or replace the file, or remove it (data.skip_corrupt=True drops unreadable files)."


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How images with more than 8 bits per sample and multi-frame DICOMs become one uint8 RGB image.

    window: (center, width) of a linear DICOM window (PS3.3 C.11.2.1.2) applied to the modality values of
      every grayscale DICOM and every 16/32-bit integer or float PNG/TIFF, overriding the file's own VOI
      LUT / window. None: the DICOM file's VOI LUT or window, else the image's own min..max (16-bit PNG/TIFF:
      value * 255 / 65535). 8-bit images are never windowed.
    dicom_frame: frame read from multi-frame DICOMs (0-based); None rejects them. Single-frame files ignore it.
    """

    window: tuple[float, float] | None = None
    dicom_frame: int | None = None

    def __post_init__(self):
        if self.window is not None:
            center, width = (float(v) for v in self.window)
            if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
                raise ValueError(f"data.window={self.window}: need a finite center and a width >= 1 (DICOM LINEAR).")
            object.__setattr__(self, "window", (center, width))
        if self.dicom_frame is not None and (isinstance(self.dicom_frame, bool) or int(self.dicom_frame) < 0):
            raise ValueError(f"data.dicom_frame={self.dicom_frame!r} must be a frame index >= 0, or None.")


def parse_window(value: Any) -> tuple[float, float] | None:
    """`data.window` -> (center, width): "" / None -> None; "40,400" or (40, 400) -> (40.0, 400.0)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        center, width = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"data.window={value!r} must be 'center,width' (e.g. '40,400', a CT soft-tissue window) or '' for the "
            "file's own window."
        ) from None
    return center, width


def decode_options_from_config(data_config) -> DecodeOptions:
    """DecodeOptions from `data.window` and `data.dicom_frame` (absent keys: the defaults)."""
    frame = data_config.get("dicom_frame", None)
    return DecodeOptions(parse_window(data_config.get("window", "")), None if frame is None else int(frame))


def is_dicom(data: bytes) -> bool:
    """True for DICOM Part 10 bytes: a 128-byte preamble followed by "DICM"."""
    return data[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + 4] == _MAGIC


def is_dicom_file(path: str | Path) -> bool:
    """True if the file starts like a DICOM Part 10 file (reads only its first 132 bytes)."""
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(_PREAMBLE_LENGTH + 4))
    except OSError:
        return False


def looks_like_dicom(data: bytes, name: str = "") -> bool:
    """DICOM by content, or a .dcm/.dicom name (then possibly an old file without the preamble)."""
    return is_dicom(data) or Path(name).suffix.lower() in DICOM_EXTENSIONS


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(values, nan=0.0)), 0, 255).astype(np.uint8)


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Windows values to 0..255 with pydicom's VOI windowing (LINEAR, LINEAR_EXACT or SIGMOID)."""
    display = _display_dataset()
    display.WindowCenter = center
    display.WindowWidth = width
    display.VOILUTFunction = function
    return _round_to_uint8(apply_windowing(np.asarray(values, np.float64), display))


def min_max_to_uint8(values: np.ndarray) -> np.ndarray:
    """Maps the array's own finite min..max to 0..255 linearly (a constant image gives zeros, NaN 0)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return _round_to_uint8((values - low) * (255.0 / (high - low)))


def _display_dataset() -> Dataset:
    """An 8-bit unsigned MONOCHROME2 description: pydicom's windowing then outputs 0..255 directly."""
    display = Dataset()
    display.PhotometricInterpretation = "MONOCHROME2"
    display.BitsStored = 8
    display.PixelRepresentation = 0
    return display


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """Item `keyword` of an enhanced multi-frame file's functional groups (per-frame wins over shared)."""
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups and index < len(groups) and groups[index].get(keyword):
            return groups[index].get(keyword)[0]
    return None


def _grayscale_description(ds: Dataset, frame: int) -> Dataset:
    """The file's rescale and VOI elements; for enhanced multi-frame files, those of `frame`'s groups."""
    description = Dataset()
    for keyword in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "ModalityLUTSequence",
                    "RescaleSlope", "RescaleIntercept", "VOILUTSequence", "WindowCenter", "WindowWidth",
                    "VOILUTFunction"):
        if keyword in ds:
            description[keyword] = ds[keyword]
    for group, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        item = _frame_item(ds, frame, group)
        for keyword in keywords if item is not None else ():
            if keyword in item:
                description[keyword] = item[keyword]
    if hasattr(ds, "file_meta"):
        description.file_meta = ds.file_meta  # apply_voi reads the byte order of OW LUT data from it
    return description


def grayscale_to_uint8(stored: np.ndarray, ds: Dataset, window: tuple[float, float] | None = None) -> np.ndarray:
    """Stored grayscale values -> uint8 through the DICOM grayscale pipeline.

    Modality LUT or rescale slope/intercept, then the configured `window` if given, else the file's VOI LUT
    (preferred, as pydicom) or window centre/width, else the min..max of the modality values; MONOCHROME1 is
    inverted last, so that low values are bright as the file intends.
    """
    values = apply_modality_lut(stored, ds)
    has_voi_lut = bool(ds.get("VOILUTSequence")) and "LUTData" in ds.VOILUTSequence[0]
    if window is not None:
        display = window_to_uint8(values, *window)
    elif has_voi_lut:
        if not np.issubdtype(values.dtype, np.integer) and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # an integral rescale: index the LUT without pydicom's float warning
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        display = _round_to_uint8(apply_voi(values, ds) * (255.0 / (2**bits - 1)))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = _display_dataset()
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            if keyword in ds:
                shown[keyword] = ds[keyword]
        display = _round_to_uint8(apply_windowing(np.asarray(values, np.float64), shown))
    else:
        display = min_max_to_uint8(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 255 - display
    return display


def _color_to_uint8(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """RGB (or palette) pixels -> uint8 RGB, scaling more than 8 bits by their full stored range."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = 16 if pixels.dtype == np.uint16 else 8
    else:
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if pixels.dtype == np.uint8 and bits == 8:
        return np.ascontiguousarray(pixels)
    return _round_to_uint8(pixels.astype(np.float64) * (255.0 / (2**bits - 1)))


def _pixel_problem(ds: Dataset, options: DecodeOptions) -> str | None:
    """Why the pixel data of `ds` cannot be decoded as configured, without decoding it; None if it can."""
    try:
        return _pixel_problem_unchecked(ds, options)
    except Exception as error:  # pydicom converts element values lazily: a bad value raises here
        return f"malformed image header ({_one_line(error)})"


def _pixel_problem_unchecked(ds: Dataset, options: DecodeOptions) -> str | None:
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        return "no pixel data (not an image, e.g. a report, or truncated before the pixels)"
    interpretation = ds.get("PhotometricInterpretation", None)
    if interpretation not in _GRAYSCALE + _RGB_AFTER_DECODING + ("PALETTE COLOR",):
        return f"unsupported PhotometricInterpretation {interpretation!r}"
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", None)
    if syntax is None:
        return "no TransferSyntaxUID in its file meta information"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"transfer syntax {syntax.name} ({syntax}) is not supported by pydicom"
    if not decoder.is_available:
        options_text = " | ".join(d.split(" - requires ")[-1] for d in decoder.missing_dependencies)
        return (
            f"transfer syntax {syntax.name} ({syntax}) needs a pixel-data plugin that is not installed; install one "
            f"of: {options_text} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
        )
    frames = int(get_nr_frames(ds, warn=False))
    if frames > 1 and options.dicom_frame is None:
        return (
            f"multi-frame DICOM with {frames} frames; set data.dicom_frame to the frame to read (0..{frames - 1}) "
            "or split the file into single-frame images"
        )
    if frames > 1 and options.dicom_frame >= frames:
        return f"data.dicom_frame={options.dicom_frame} but the file has only {frames} frames (0..{frames - 1})"
    try:
        if syntax.is_encapsulated:
            if not any(len(fragment) for fragment in generate_fragments(ds[keyword].value)):
                return "encapsulated pixel data without any fragment"
        else:
            expected, stored = get_expected_length(ds, "bytes"), len(ds[keyword].value)
            if stored < expected:
                return f"truncated pixel data ({stored} of {expected} bytes)"
    except Exception as error:  # a malformed size element or fragment item
        return f"malformed pixel data ({_one_line(error)})"
    return None


def check_dicom(data: bytes, options: DecodeOptions = DecodeOptions()) -> str | None:
    """Cheap validity check for the corrupt-file scan: the reason `decode_dicom` would fail, or None.

    Parses the dataset and checks pixel data length (or encapsulation), plugin and frame, without decoding.
    """
    try:
        ds = _read(data)
    except Exception as error:  # pydicom raises InvalidDicomError, EOFError, struct.error... for bad files
        return f"not a readable DICOM file ({_one_line(error)})"
    return _explain(_pixel_problem(ds, options), data)


def _explain(problem: str | None, data: bytes) -> str | None:
    if problem and not is_dicom(data):
        return f"{problem}; it has no 'DICM' marker at byte 128, so it was read as a bare dataset (not DICOM?)"
    return problem


def decode_dicom(data: bytes, name: str, options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Decodes DICOM bytes to uint8 (H, W, 3) RGB; every failure is a ValueError naming `name` and the reason.

    Grayscale: see `grayscale_to_uint8` (with no configured window and no VOI LUT / window in the file, the
    image's own min..max becomes 0..255). RGB and YBR (converted by pydicom) pass through; palette colour is
    looked up; more than 8 bits per colour sample are scaled by 255 / (2**BitsStored - 1). Multi-frame files
    need `options.dicom_frame`. Compressed transfer syntaxes use whichever pydicom plugins are installed.
    """
    try:
        ds = _read(data)
    except Exception as error:
        reason = f"not a readable DICOM file ({_one_line(error)})"
        raise ValueError(f"Cannot decode DICOM {name}: {reason}. {_HELP}") from error
    problem = _explain(_pixel_problem(ds, options), data)
    if problem:
        raise ValueError(f"Cannot decode DICOM {name}: {problem}.")
    frames = int(get_nr_frames(ds, warn=False))
    frame = options.dicom_frame if frames > 1 else None
    try:
        pixels = pixel_array(ds, index=frame)
        if ds.PhotometricInterpretation in _GRAYSCALE:
            if pixels.ndim != 2:
                raise ValueError(f"grayscale pixel array of shape {pixels.shape}, expected (rows, columns)")
            gray = grayscale_to_uint8(pixels, _grayscale_description(ds, frame or 0), options.window)
            return np.repeat(gray[:, :, None], 3, axis=2)
        rgb = _color_to_uint8(pixels, ds)
    except Exception as error:  # decoding plugins raise RuntimeError, ValueError... with multi-line messages
        raise ValueError(f"Cannot decode DICOM {name}: {_one_line(error)}. {_HELP}") from error
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"Cannot decode DICOM {name}: colour pixel array of shape {rgb.shape}, expected (H, W, 3).")
    return rgb
