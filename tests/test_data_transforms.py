"""Each augmentation checked against its definition, and against torchvision where it is installed."""

import numpy as np
import pytest
from PIL import Image

from cass_jax.data import transforms as T


def _image(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_flips_are_flips():
    aug = T.CassAugment(image_size=40, group_probability=0.0, flip_probability=1.0)
    image = _image((40, 40))
    out = aug.augment(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, np.asarray(image)[::-1, ::-1])


def test_no_op_probabilities_give_plain_resize():
    aug = T.CassAugment(image_size=32, group_probability=0.0, flip_probability=0.0)
    image = _image()
    np.testing.assert_array_equal(aug.augment(image, np.random.default_rng(1)), np.asarray(T.resize(image, 32)))


def test_rotation_zero_is_identity_and_ninety_is_a_quarter_turn():
    image = _image((32, 32))
    np.testing.assert_array_equal(np.asarray(T.rotate(image, 0.0)), np.asarray(image))
    # Clockwise by 90 degrees about (w/2, h/2), as torchvision F.affine: exactly np.rot90(k=-1).
    np.testing.assert_array_equal(np.asarray(T.rotate(image, 90.0)), np.rot90(np.asarray(image), k=-1))


def test_jitter_zero_and_unit_factors_are_identity():
    image = _image()
    same = T.color_jitter(image, np.random.default_rng(0), 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(image))
    for adjust in (T.adjust_brightness, T.adjust_contrast, T.adjust_saturation):
        np.testing.assert_array_equal(np.asarray(adjust(image, 1.0)), np.asarray(image))


def test_brightness_contrast_saturation_definitions():
    x = np.asarray(_image()).astype(np.float64)
    bright = np.asarray(T.adjust_brightness(Image.fromarray(x.astype(np.uint8)), 0.5)).astype(np.float64)
    assert np.abs(bright - x * 0.5).max() <= 1.0
    gray = np.asarray(_image().convert("L")).astype(np.float64)
    contrast = np.asarray(T.adjust_contrast(_image(), 0.0)).astype(np.float64)
    assert np.abs(contrast - round(gray.mean())).max() <= 1.0  # factor 0: the mean gray level
    desaturated = np.asarray(T.adjust_saturation(_image(), 0.0)).astype(np.float64)
    assert np.abs(desaturated - gray[..., None]).max() <= 1.0  # factor 0: grayscale


def test_perspective_identity_points_and_bounds():
    image = _image((40, 40))
    corners = [[0, 0], [39, 0], [39, 39], [0, 39]]
    same = np.asarray(T.perspective(image, corners, corners)).astype(int)
    assert np.abs(same - np.asarray(image)).max() <= 1  # PIL's bilinear sampling rounds in fixed point
    rng = np.random.default_rng(0)
    for _ in range(50):
        start, end = T.perspective_points(384, 384, 0.2, rng)
        assert start == [[0, 0], [383, 0], [383, 383], [0, 383]]
        for (x, y), (sx, sy) in zip(end, start):
            assert abs(x - sx) <= 0.2 * 192 + 1 and abs(y - sy) <= 0.2 * 192 + 1


def test_normalize_batch_matches_formula():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(T.normalize_batch(images, mean, std), expected, atol=1e-5)


def test_augment_is_a_function_of_the_generator():
    aug = T.CassAugment(image_size=48, group_probability=1.0, flip_probability=0.5)
    image = _image()
    a = aug.augment(image, np.random.default_rng(3))
    b = aug.augment(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    outputs = {aug.augment(image, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(outputs) == 5


def test_gray_fast_path_gives_the_same_pixels_as_rgb():
    gray = np.asarray(_image((40, 36)).convert("L"))
    record = {"image": np.repeat(gray[:, :, None], 3, axis=2), "label": 0, "id": "g"}
    assert T.to_pil(record["image"]).mode == "L"
    fast = T.CassAugment(image_size=48, group_probability=1.0, jitter_with_rotation=True)
    slow = T.CassAugment(image_size=48, group_probability=1.0, jitter_with_rotation=True, gray_fast_path=False)
    for seed in range(12):
        a = fast(record, np.random.default_rng(seed))["image"]
        b = slow(record, np.random.default_rng(seed))["image"]
        assert a.shape == b.shape == (48, 48, 3)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(T.EvalTransform(48)(record)["image"], T.EvalTransform(48, False)(record)["image"])


def test_decode_converts_grayscale_and_names_bad_files(tmp_path):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(buffer, "PNG")
    rgb = T.decode_image(buffer.getvalue(), "gray.png")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8 and (rgb == 100).all()
    with pytest.raises(ValueError, match="notes.jpg.*skip_corrupt"):
        T.decode_image(b"just some text", "notes.jpg")


class TestAgainstTorchvision:
    """Same parameters -> same pixels as torchvision's PIL path."""

    tvf = pytest.importorskip("torchvision.transforms.functional")

    def test_resize(self):
        tv = pytest.importorskip("torchvision.transforms")
        image = _image((60, 50))
        np.testing.assert_array_equal(np.asarray(T.resize(image, 96)), np.asarray(tv.Resize((96, 96))(image)))

    def test_rotation(self):
        image = _image((64, 64))
        for angle in (-9.3, 4.0, 10.0):
            ours = np.asarray(T.rotate(image, angle))
            theirs = np.asarray(self.tvf.affine(image, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0]))
            np.testing.assert_array_equal(ours, theirs)

    def test_perspective(self):
        image = _image((64, 64))
        start, end = T.perspective_points(64, 64, 0.2, np.random.default_rng(7))
        theirs = self.tvf.perspective(image, start, end, fill=[0.0, 0.0, 0.0])
        np.testing.assert_array_equal(np.asarray(T.perspective(image, start, end)), np.asarray(theirs))

    def test_color_adjustments(self):
        image = _image()
        for ours, theirs in (
            (T.adjust_brightness, self.tvf.adjust_brightness),
            (T.adjust_contrast, self.tvf.adjust_contrast),
            (T.adjust_saturation, self.tvf.adjust_saturation),
        ):
            np.testing.assert_array_equal(np.asarray(ours(image, 1.17)), np.asarray(theirs(image, 1.17)))
