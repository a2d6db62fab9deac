"""Image transforms shared by every method: the evaluation transform, the CASS augmentation, and the
per-view crop-and-jitter recipe that DINO's multi-crop and Barlow Twins' two views are built from.

They run on the CPU in grain workers (PIL + NumPy) and follow torchvision's semantics; see
`CassAugment` and `ViewAugmentation` for the (small) documented differences.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cass_jax.data.dicom import DecodeOptions, decode_dicom, looks_like_dicom, min_max_to_uint8, window_to_uint8

Record = dict[str, Any]


# PIL modes converted to RGB without warning: lossless (1, L, P, RGB, RGBX) or a standard colour transform.
_SILENT_MODES = ("1", "L", "P", "RGB", "RGBX", "YCbCr", "HSV")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_UNSIGNED_16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_warned: set[str] = set()


def _warn_once(kind: str, message: str, *args) -> None:
    """Logs `message` the first time `kind` happens in this process (each grain worker warns once)."""
    if kind not in _warned:
        _warned.add(kind)
        logging.warning(message + " (logged once per process)", *args)


def _pil_to_rgb(image: Image.Image, name: str, options: DecodeOptions) -> np.ndarray:
    """PIL image -> uint8 (H, W, 3) without silently losing information (see `decode_image`)."""
    mode = image.mode
    if mode in _UNSIGNED_16_MODES or (mode == "I" and image.format == "PNG"):  # PNG "I": 16-bit in old Pillow
        values = np.asarray(image)
        if options.window is not None:
            gray = window_to_uint8(values, *options.window)
        else:
            gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
            if 0 < values.max() < 4096:
                _warn_once(
                    "low_16_bit",
                    "%s is a 16-bit image whose values stay below 4096 (12-bit data?), so it decodes dark with few "
                    "gray levels (value * 255 / 65535). For 12-bit data set data.window='2048,4096'",
                    name,
                )
    elif mode in ("I", "F") or mode.startswith(("I;", "F;")):
        values = np.asarray(image.convert("F") if mode not in ("I", "F") else image)
        gray = window_to_uint8(values, *options.window) if options.window is not None else min_max_to_uint8(values)
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        alpha = rgba[:, :, 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3])
        _warn_once("alpha", "%s (mode %s) has transparent pixels; they are composited over black", name, mode)
        return np.rint(rgba[:, :, :3] * (alpha / 255.0)).astype(np.uint8)
    elif mode in _SILENT_MODES:
        return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    else:
        _warn_once(
            f"mode_{mode}", "%s has mode %s; PIL converts it to RGB without colour management, colours may shift",
            name, mode,
        )
        return np.asarray(image.convert("RGB"))
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_image(data: bytes, name: str, options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Decodes encoded image bytes to uint8 (H, W, 3) RGB; bad bytes raise a ValueError naming `name`.

    DICOM (recognised by its "DICM" magic, or a .dcm/.dicom name) goes to `decode_dicom`. Other formats are
    read with PIL: gray, palette and bilevel images become RGB; 16-bit unsigned images (I;16, 16-bit PNG/TIFF)
    are scaled by 255 / 65535 (a value v * 257 decodes to v); 32-bit integer and float images are mapped
    from their own min..max. `options.window` (data.window) windows all of these instead, as DICOM does.
    Transparent pixels are composited over black; modes PIL converts only approximately (CMYK, LAB) and
    16-bit images that look 12-bit are logged once per process.
    """
    if looks_like_dicom(data, name):
        return decode_dicom(data, name, options)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _pil_to_rgb(image, name, options)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files.
        raise ValueError(
            f"Cannot decode image {name}: {error}. The file is unreadable or truncated: replace or delete "
            "it, or set data.skip_corrupt=True to drop corrupt images when the splits are loaded."
        ) from error


def resize(image: Image.Image, size: int) -> Image.Image:
    """Resizes to size x size with antialiased bilinear filtering (torchvision Resize on PIL)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BILINEAR)


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """Scales intensities by `factor` (torchvision adjust_brightness; 1 is the identity)."""
    return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """Blends with the mean gray level (torchvision adjust_contrast; 1 is the identity)."""
    return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """Blends with the grayscale image (torchvision adjust_saturation; 1 is the identity)."""
    return ImageEnhance.Color(image).enhance(factor)


def color_jitter(
    image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float, saturation: float
) -> Image.Image:
    """torchvision ColorJitter: factors uniform in [1-x, 1+x], applied in a random order."""
    adjustments = (
        (adjust_brightness, brightness),
        (adjust_contrast, contrast),
        (adjust_saturation, saturation),
    )
    for i in rng.permutation(len(adjustments)):
        adjust, amount = adjustments[i]
        if amount > 0:
            image = adjust(image, float(rng.uniform(max(0.0, 1 - amount), 1 + amount)))
    return image


def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision F.adjust_hue on PIL: HSV hue channel + int(factor * 255), wrapping mod 256.

    Gray images ("L" and other single-channel modes) are returned unchanged, as torchvision returns them.
    """
    if image.mode in ("L", "1", "I", "F"):
        return image
    hue, saturation, value = image.convert("HSV").split()
    shifted = ((np.asarray(hue, np.int32) + int(factor * 255)) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert(image.mode)


def color_jitter_with_hue(
    image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> Image.Image:
    """torchvision ColorJitter(b, c, s, h): draw an order, then every factor, then apply them in that order.

    Factors are uniform in [max(0, 1 - x), 1 + x] (hue: [-h, h]); a zero amount is skipped and draws nothing,
    as torchvision does. `color_jitter` (CASS's) has no hue and draws each factor as it goes.
    """
    order = rng.permutation(4)
    ranges = (
        (brightness, max(0.0, 1 - brightness), 1 + brightness),
        (contrast, max(0.0, 1 - contrast), 1 + contrast),
        (saturation, max(0.0, 1 - saturation), 1 + saturation),
        (hue, -hue, hue),
    )
    factors = [float(rng.uniform(low, high)) if amount > 0 else None for amount, low, high in ranges]
    adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for i in order:
        if factors[i] is not None:
            image = adjustments[i](image, factors[i])
    return image


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width) of a random crop.

    Area fraction uniform in `scale`, log aspect ratio uniform in log(`ratio`); ten tries, then a centre crop.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """torchvision F.resized_crop on PIL with bicubic interpolation: crop (top, left, h, w), resize to size^2."""
    top, left, h, w = box
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def perspective_points(
    width: int, height: int, distortion: float, rng: np.random.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    """Corner displacements of torchvision RandomPerspective.get_params (integer pixels)."""
    half_w, half_h = width // 2, height // 2
    dx, dy = int(distortion * half_w) + 1, int(distortion * half_h) + 1

    def draw(low: int, high: int) -> int:
        return int(rng.integers(low, high))

    topleft = [draw(0, dx), draw(0, dy)]
    topright = [draw(width - dx, width), draw(0, dy)]
    botright = [draw(width - dx, width), draw(height - dy, height)]
    botleft = [draw(0, dx), draw(height - dy, height)]
    start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    return start, [topleft, topright, botright, botleft]


def perspective_coefficients(start: Sequence[Sequence[int]], end: Sequence[Sequence[int]]) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output to input pixels (torchvision _get_perspective_coeffs)."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(end, start)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    b = np.asarray(start, np.float64).reshape(8)
    return np.linalg.lstsq(a, b, rcond=None)[0].astype(np.float32).tolist()


def perspective(image: Image.Image, start, end) -> Image.Image:
    """Warps so that corners `start` move to `end`; bilinear, black fill (torchvision F.perspective)."""
    coefficients = perspective_coefficients(start, end)
    return image.transform(image.size, Image.PERSPECTIVE, coefficients, Image.BILINEAR, fillcolor=0)


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotates clockwise (torchvision F.affine's convention) about the centre; nearest, black fill.

    The inverse matrix of torchvision F.affine(angle, translate=0, scale=1, shear=0) on PIL images,
    centred at (w/2, h/2) as torchvision does.
    """
    if degrees == 0:
        return image
    width, height = image.size
    cx, cy = width * 0.5, height * 0.5
    rot = math.radians(degrees)
    m = [math.cos(rot), math.sin(rot), 0.0, -math.sin(rot), math.cos(rot), 0.0]
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return image.transform(image.size, Image.AFFINE, m, Image.NEAREST, fillcolor=0)


def normalize_batch(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., 3) -> float32 ((x / 255) - mean) / std, in one fused pass over the batch."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    out = images.astype(np.float32)
    out *= scale
    out += offset
    return out


def to_pil(array: np.ndarray, gray_fast_path: bool = True) -> Image.Image:
    """uint8 (H, W, 3) -> PIL image; mode "L" when all three channels are equal.

    Every CASS operation treats channels alike (resize, warps, brightness) or, on a gray image, uses
    the image's own gray values (contrast's mean, saturation's grayscale: PIL's RGB->L weights sum to
    exactly 1), so working on one channel gives the same pixels 3x cheaper. Most MRI files are gray.
    """
    if gray_fast_path and array.ndim == 3 and array.shape[2] == 3:
        gray = array[:, :, 0]
        if np.array_equal(gray, array[:, :, 1]) and np.array_equal(gray, array[:, :, 2]):
            return Image.fromarray(np.ascontiguousarray(gray), "L")
    return Image.fromarray(array)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 (H, W, 3)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Evaluation transform: RGB uint8 image -> resized uint8 image (normalised later, per batch)."""

    image_size: int
    gray_fast_path: bool = True

    def __call__(self, record: Record) -> Record:
        image = to_pil(record["image"], self.gray_fast_path)
        return {**record, "image": to_rgb_array(resize(image, self.image_size))}


@dataclasses.dataclass(frozen=True)
class CassAugment:
    """The CASS training augmentation, as a grain random map (record, rng) -> record.

    torchvision pipeline it reproduces (official CASS code):
      Resize(S); RandomApply([ColorJitter(.2, .2, .2), RandomPerspective(.2, p=.5)], p=.3);
      RandomApply([RandomAffine(10)], p=.3)  (ISIC version: [ColorJitter(.2, .2, .2), RandomAffine(10)]);
      RandomVerticalFlip(.3); RandomHorizontalFlip(.3); ToTensor; Normalize.
    Each step uses the same PIL operation as torchvision's PIL path (Image.resize bilinear with
    antialias, ImageEnhance, Image.transform PERSPECTIVE bilinear / AFFINE nearest, black fill), so for
    the same random parameters the output is pixel-identical. Differences:
    - random numbers come from the NumPy generator grain derives from (seed, epoch, example index),
      not from torch's global generator, so draws differ from a torch run (distributions are the same);
    - normalisation happens when the batch is assembled (same values as ToTensor + Normalize);
    - images whose three channels are equal are processed as one gray channel (same values, see
      `to_pil`; `gray_fast_path=False` turns this off);
    - perspective coefficients are solved with NumPy lstsq instead of torch gels (same float32 result
      up to rounding).
    """

    image_size: int
    jitter: float = 0.2
    distortion: float = 0.2
    perspective_probability: float = 0.5
    degrees: float = 10.0
    group_probability: float = 0.3
    flip_probability: float = 0.3
    jitter_with_rotation: bool = False
    gray_fast_path: bool = True

    def augment(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Returns the augmented, resized uint8 (S, S, 3) array."""
        image = resize(image, self.image_size)
        if rng.random() < self.group_probability:
            image = color_jitter(image, rng, self.jitter, self.jitter, self.jitter)
            if rng.random() < self.perspective_probability:
                start, end = perspective_points(image.width, image.height, self.distortion, rng)
                image = perspective(image, start, end)
        if rng.random() < self.group_probability:
            if self.jitter_with_rotation:
                image = color_jitter(image, rng, self.jitter, self.jitter, self.jitter)
            image = rotate(image, float(rng.uniform(-self.degrees, self.degrees)))
        if rng.random() < self.flip_probability:
            image = image.transpose(Image.FLIP_TOP_BOTTOM)
        if rng.random() < self.flip_probability:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_rgb_array(image)

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        return {**record, "image": self.augment(to_pil(record["image"], self.gray_fast_path), rng)}


@dataclasses.dataclass(frozen=True)
class ViewAugmentation:
    """One view of the BYOL-style recipe DINO and Barlow Twins share: (PIL image, rng) -> uint8 (size, size, 3).

    As torchvision + the official GaussianBlur / Solarization classes, in this order:
      RandomResizedCrop(size, scale, ratio, bicubic); RandomHorizontalFlip(flip_probability);
      RandomApply([ColorJitter(*jitter)], jitter_probability); RandomGrayscale(grayscale_probability);
      GaussianBlur(blur_probability, radius U(blur_radius)); Solarization(solarization_probability).
    The methods differ only in these numbers (DinoMultiCrop, BarlowTwinsViews). Random numbers come from
    the NumPy generator grain passes (derived from seed, epoch and example index), not torch's and Python's
    global generators: same distributions, other draws. A gray input ("L", see `to_pil`) stays gray: every
    step gives the same pixels as on its RGB copy, hue and grayscale are identities on it.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_radius: tuple[float, float] = (0.1, 2.0)
    solarization_probability: float = 0.0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        view = resized_crop(image, random_resized_crop_box(image.width, image.height, self.scale, rng, self.ratio),
                            self.size)
        if rng.random() < self.flip_probability:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_probability:
            view = color_jitter_with_hue(view, rng, *self.jitter)
        if rng.random() < self.grayscale_probability:
            view = view.convert("L")
        if rng.random() < self.blur_probability:
            view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*self.blur_radius))))
        if rng.random() < self.solarization_probability:
            view = ImageOps.solarize(view)
        return to_rgb_array(view)
