"""Procedural 4-class brain-MRI-like phantoms: a dataset that needs no download.

Each image is a function of (seed, index) only, so the set is identical on every machine.
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: bilinear upsampling of a coarse random grid."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def synthetic_label(index: int) -> int:
    """Class of phantom `index`: classes cycle so every class gets a quarter of the images."""
    return index % len(SYNTHETIC_CLASS_NAMES)


def synthetic_phantom(index: int, seed: int = 0, size: int = 224, contrast: float = 1.0,
                      lesion_scale: float = 1.0) -> np.ndarray:
    """Returns phantom `index` as uint8 (size, size, 3), RGB with equal channels.

    A head (bright skull ring around textured brain with darker ventricles), randomly rotated,
    scaled, shifted, with random intensity and noise. The class sets the lesion:
    glioma: large irregular lesion with a bright rim and dark core inside a hemisphere;
    meningioma: bright round lesion touching the skull; notumor: none;
    pituitary: small bright lesion on the midline below the brain centre.
    Lesions are deliberately faint and small relative to texture and noise, so the task is not trivial.
    `contrast` and `lesion_scale` multiply their contrast and radius: 1.0 gives these images bit for bit; the demo
    raises both so that tiny random arms learn the classes within its few minutes.
    """
    label = synthetic_label(index)
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy = (yy + 0.5) / size * 2 - 1
    xx = (xx + 0.5) / size * 2 - 1
    angle = rng.uniform(-0.5, 0.5)
    scale = rng.uniform(0.75, 0.95)
    cy, cx = rng.uniform(-0.06, 0.06, 2)
    c, s = np.cos(angle), np.sin(angle)
    # Head-centred coordinates: u across, v along the head's long axis.
    u = (c * (xx - cx) + s * (yy - cy)) / scale
    v = (-s * (xx - cx) + c * (yy - cy)) / scale
    ax, ay = rng.uniform(0.72, 0.82), rng.uniform(0.88, 0.98)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    image = np.zeros((size, size))
    skull = (r > 0.9) & (r <= 1.0)
    brain = r <= 0.9
    image[skull] = rng.uniform(0.75, 0.95)
    texture = _smooth_noise(rng, size, 6) * 0.08 + _smooth_noise(rng, size, 20) * 0.05
    tissue = rng.uniform(0.42, 0.55)
    image[brain] = (tissue + texture)[brain]
    # Ventricles: two dark ellipses near the centre, a normal structure present in every class.
    for side in (-1, 1):
        vr = np.sqrt(((u - side * 0.1) / 0.07) ** 2 + ((v + 0.05) / 0.2) ** 2)
        image[vr < 1] -= rng.uniform(0.15, 0.25)
    lesion_contrast = rng.uniform(0.12, 0.3) * contrast
    if label == 0:  # glioma: irregular lesion, bright rim, dark necrotic core, inside a hemisphere.
        side = rng.choice([-1, 1])
        lx, ly = side * rng.uniform(0.25, 0.45), rng.uniform(-0.45, 0.25)
        radius = rng.uniform(0.14, 0.24) * lesion_scale
        phi = np.arctan2(v - ly, u - lx)
        wobble = 1 + 0.25 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * phi + rng.uniform(0, 6.3))
        d = np.sqrt((u - lx) ** 2 + (v - ly) ** 2) / (radius * wobble)
        image[(d < 1) & (d > 0.7) & brain] += lesion_contrast
        image[(d <= 0.7) & brain] -= lesion_contrast * 0.6
    elif label == 1:  # meningioma: round, homogeneous, bright, attached to the skull.
        theta = rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(0.1, 0.18) * lesion_scale
        lx, ly = np.cos(theta) * ax * (0.9 - radius * 0.8), np.sin(theta) * ay * (0.9 - radius * 0.8)
        d = np.sqrt((u - lx) ** 2 + (v - ly) ** 2) / radius
        image[(d < 1) & brain] += lesion_contrast
    elif label == 3:  # pituitary: small bright lesion on the midline, low in the brain.
        lx, ly = rng.uniform(-0.05, 0.05), rng.uniform(0.35, 0.5)
        radius = rng.uniform(0.06, 0.11) * lesion_scale
        d = np.sqrt(((u - lx) / radius) ** 2 + ((v - ly) / (radius * 0.8)) ** 2)
        image[(d < 1) & brain] += lesion_contrast * 1.3
    image *= rng.uniform(0.8, 1.2)
    image += rng.normal(0.0, rng.uniform(0.03, 0.07), image.shape)
    gray = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
