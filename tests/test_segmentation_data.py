"""Segmentation data: pair sources and their errors, the labelled split, augmentation alignment, two-stream batches."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cass_jax.data.sources import DataError
from cass_jax.segmentation import augment as augment_lib
from cass_jax.segmentation.data import (
    ACDC_STEM_PATTERN,
    acdc_splits,
    csv_pairs,
    folder_pairs,
    labeled_split,
    volume_groups,
)
from cass_jax.segmentation.evaluation import evaluate_volumes
from cass_jax.segmentation.loader import two_stream_iterator
from cass_jax.segmentation.metrics import class_scores

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"


def smooth_image(shape, seed: int) -> np.ndarray:
    """uint8 image of smooth random blobs spanning 0..255, so thresholds give large connected regions."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape[:2]), 3.0)
    field = (field - field.min()) / (field.max() - field.min())
    image = np.rint(field * 255).astype(np.uint8)
    return np.repeat(image[..., None], shape[2], axis=2) if len(shape) == 3 else image


def classes_of(image: np.ndarray) -> np.ndarray:
    """The 'anatomy' drawn from the image itself: 4 classes by intensity (0 stays 0, as zero fill does)."""
    gray = image if image.ndim == 2 else image[..., 0]
    return np.digitize(gray, [64, 128, 192]).astype(np.uint8)


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def make_acdc_like(root: Path, patients: int = 3, frames: int = 2, slices: int = 3, size=(20, 24)) -> None:
    for p in range(1, patients + 1):
        for f in range(1, frames + 1):
            for s in range(1, slices + 1):
                image = smooth_image(size, 100 * p + 10 * f + s)
                write_pair(root, f"patient{p:03d}_frame{f:02d}_slice{s:02d}", image, classes_of(image))


def test_folder_source_reads_pairs_with_patients_and_volumes(tmp_path):
    make_acdc_like(tmp_path)
    source = folder_pairs(tmp_path, num_classes=4, stem_pattern=ACDC_STEM_PATTERN)
    assert len(source) == 18 and source.patient_ids() == ["patient001", "patient002", "patient003"]
    record = source[4]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (20, 24)
    assert record["mask"].dtype == np.uint8 and record["mask"].shape == (20, 24)
    assert record["id"] == "patient001_frame02_slice02" and record["volume"] == "patient001_frame02"
    assert record["patient"] == "patient001" and record["slice"] == 2
    np.testing.assert_array_equal(record["mask"], classes_of(record["image"]))
    groups = volume_groups(source.subset(np.arange(18)[::-1]))
    assert len(groups) == 6 and [source.subset(np.arange(18)[::-1]).slices[i]
                                 for i in groups["patient002_frame01"]] == [1, 2, 3]
    rgb = folder_pairs(tmp_path, num_classes=4, channels=3)[0]["image"]
    assert rgb.shape == (20, 24, 3) and np.array_equal(rgb[..., 0], source[0]["image"])


def test_csv_source(tmp_path):
    make_acdc_like(tmp_path, patients=1, frames=1, slices=2)
    (tmp_path / "pairs.csv").write_text("image,mask,patient\nimages/patient001_frame01_slice02.png,"
                                        "masks/patient001_frame01_slice02.png,p7\n")
    source = csv_pairs(tmp_path / "pairs.csv", num_classes=4)
    assert len(source) == 1 and source[0]["patient"] == "p7" and source[0]["id"] == "patient001_frame01_slice02"
    (tmp_path / "bad.csv").write_text("image,mask\nimages/nope.png,masks/patient001_frame01_slice01.png\n")
    with pytest.raises(DataError, match=r"bad.csv line 2: image .*nope.png does not exist"):
        csv_pairs(tmp_path / "bad.csv", num_classes=4)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_pairs_are_one_line_errors_naming_the_file(tmp_path):
    make_acdc_like(tmp_path, patients=1, frames=1, slices=2)
    (tmp_path / "masks" / "patient001_frame01_slice02.png").unlink()
    with pytest.raises(DataError) as error:
        folder_pairs(tmp_path, num_classes=4)
    assert "No mask for image" in one_line(error) and "patient001_frame01_slice02.png" in str(error.value)

    Image.fromarray(np.zeros((20, 23), np.uint8)).save(tmp_path / "masks" / "patient001_frame01_slice02.png")
    source = folder_pairs(tmp_path, num_classes=4)
    with pytest.raises(DataError) as error:
        source[1]
    assert "masks/patient001_frame01_slice02.png is 20x23" in one_line(error) and "20x24" in str(error.value)

    mask = np.zeros((20, 24), np.uint8)
    mask[3, 3] = 7
    Image.fromarray(mask).save(tmp_path / "masks" / "patient001_frame01_slice02.png")
    with pytest.raises(DataError) as error:
        folder_pairs(tmp_path, num_classes=4).check()
    assert "class value 7" in one_line(error) and "num_classes=4" in str(error.value)
    assert "patient001_frame01_slice02.png" in str(error.value)

    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "masks" / "patient001_frame01_slice02.png")
    with pytest.raises(DataError) as error:
        folder_pairs(tmp_path, num_classes=4)[1]
    assert "mode RGB" in one_line(error)


def test_labeled_split_by_patients_and_by_seeded_fraction(tmp_path):
    make_acdc_like(tmp_path, patients=4)
    source = folder_pairs(tmp_path, num_classes=4, stem_pattern=ACDC_STEM_PATTERN)
    labeled, unlabeled = labeled_split(source, labeled_patients=["patient002", "patient004"])
    assert {source.patients[i] for i in labeled} == {"patient002", "patient004"} and len(labeled) == 12
    assert sorted(np.concatenate([labeled, unlabeled]).tolist()) == list(range(24))
    with pytest.raises(DataError, match="patient009"):
        labeled_split(source, labeled_patients=["patient009"])
    first, _ = labeled_split(source, labeled_fraction=0.25, seed=1)
    again, rest = labeled_split(source, labeled_fraction=0.25, seed=1)
    other, _ = labeled_split(source, labeled_fraction=0.25, seed=2)
    assert len(first) == 6 and np.array_equal(first, again) and not np.array_equal(first, other)
    assert not set(first) & set(rest) and len(rest) == 18


def misaligned_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return classes_of(image) != mask


@pytest.mark.parametrize("shape", [(36, 52), (40, 40, 3)])
def test_augmentation_keeps_image_and_mask_aligned(shape):
    """The mask drawn from the image must equal the one drawn from the augmented image, pixel for pixel (every
    resampling is nearest-neighbour, zero fill maps to class 0), over enough draws to take every branch."""
    transform = augment_lib.RandomGenerator(output_size=32)
    branches = set()
    for seed in range(40):
        image = smooth_image(shape, seed)
        record = {"image": image, "mask": classes_of(image)}
        rng = np.random.default_rng(seed)
        first, second = rng.random(), rng.random()
        branches.add("rot90_flip" if first > 0.5 else "rotate" if second > 0.5 else "none")
        out = transform(record, np.random.default_rng(seed))
        assert out["image"].shape == (32, 32) + shape[2:] and out["mask"].shape == (32, 32)
        assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8
        assert not misaligned_pixels(out["image"], out["mask"]).any(), seed
    assert branches == {"rot90_flip", "rotate", "none"}
    # The check catches a mask that misses one step of the image's geometry (here one quarter turn).
    image = smooth_image(shape, 0)
    wrong = augment_lib.zoom_to(np.rot90(classes_of(image)), 32, 32)
    assert misaligned_pixels(augment_lib.zoom_to(image, 32, 32), wrong).mean() > 0.2


def test_bilinear_image_zoom_disagrees_only_on_class_boundaries():
    """With image_order=1 (not SSL4MIS's default) the mask stays nearest: mismatches may only sit on pixels next to
    a class boundary of the nearest-neighbour mask, and stay a small share of them."""
    transform = augment_lib.RandomGenerator(output_size=48, image_order=1)
    for seed in range(10):
        image = smooth_image((36, 52), seed)
        out = transform({"image": image, "mask": classes_of(image)}, np.random.default_rng(seed))
        mask = out["mask"]
        boundary = np.zeros_like(mask, bool)
        for axis in (0, 1):
            step = np.diff(mask.astype(int), axis=axis) != 0
            lead = [slice(None)] * 2
            lead[axis] = slice(1, None)
            boundary[tuple(lead)] |= step
            lead[axis] = slice(None, -1)
            boundary[tuple(lead)] |= step
        wrong = misaligned_pixels(out["image"], mask)
        assert not (wrong & ~ndimage.binary_dilation(boundary)).any(), seed
        assert wrong.sum() <= 0.5 * boundary.sum() + 1, seed


class IndexSource:
    """Constant images whose value is the example's index: batches reveal which examples they hold."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def subset(self, indices):
        return IndexedSubset(self, np.asarray(indices))


class IndexedSubset:
    def __init__(self, parent, indices):
        self.parent, self.indices = parent, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i % len(self.indices)])
        return {"image": np.full((8, 8), index, np.uint8), "mask": np.full((8, 8), index % 4, np.uint8)}


def batch_indices(batch, key):
    return np.rint(batch[key][:, 0, 0, 0] * 255).astype(int).tolist()


def test_two_stream_batches_follow_ssl4mis_sampler():
    source = IndexSource(60)
    labeled, unlabeled = np.arange(0, 20), np.arange(20, 60)
    iterator = two_stream_iterator(source, labeled, unlabeled, image_size=8, seed=3, labeled_batch_size=6,
                                   unlabeled_batch_size=6, augment=False)
    steps = 3  # 20 // 6: two labelled images dropped per epoch
    batches = [next(iterator) for _ in range(3 * steps)]
    assert batches[0]["labeled_mask"].dtype == np.int32 and batches[0]["labeled_image"].shape == (6, 8, 8, 1)
    epochs = []
    for epoch in range(3):
        taken = sum((batch_indices(b, "labeled_image") for b in batches[epoch * steps:(epoch + 1) * steps]), [])
        assert len(set(taken)) == 18 and set(taken) <= set(labeled)
        seen = sum((batch_indices(b, "unlabeled_image") for b in batches[epoch * steps:(epoch + 1) * steps]), [])
        assert len(set(seen)) == 18 and set(seen) <= set(unlabeled)   # one fresh permutation per labelled epoch
        epochs.append(taken)
    assert epochs[0] != epochs[1] != epochs[2]
    for b in batches:
        np.testing.assert_array_equal(b["labeled_mask"][:, 0, 0], np.asarray(batch_indices(b, "labeled_image")) % 4)

    state = iterator.get_state()
    following = next(iterator)
    iterator.set_state(state)
    assert batch_indices(next(iterator), "unlabeled_image") == batch_indices(following, "unlabeled_image")
    again = two_stream_iterator(source, labeled, unlabeled, image_size=8, seed=3, labeled_batch_size=6,
                                unlabeled_batch_size=6, augment=False)
    assert batch_indices(next(again), "labeled_image") == batch_indices(batches[0], "labeled_image")
    halves = [next(two_stream_iterator(source, labeled, unlabeled, image_size=8, seed=3, labeled_batch_size=6,
                                       unlabeled_batch_size=6, augment=False, shard_index=i, shard_count=2))
              for i in range(2)]
    for key in ("labeled_image", "unlabeled_image"):
        assert batch_indices(halves[0], key) + batch_indices(halves[1], key) == (
            batch_indices(batches[0], key)[0::2] + batch_indices(batches[0], key)[1::2])
    only_labeled = next(two_stream_iterator(source, labeled, unlabeled, image_size=8, seed=3, labeled_batch_size=6,
                                            unlabeled_batch_size=0, augment=False))
    assert set(only_labeled) == {"labeled_image", "labeled_mask"}
    with pytest.raises(ValueError, match="cannot fill one labelled batch"):
        two_stream_iterator(source, labeled[:4], unlabeled, image_size=8, seed=0, labeled_batch_size=6)


def test_augmented_batches_repeat_with_the_seed(tmp_path):
    make_acdc_like(tmp_path, patients=2, frames=1, slices=4)
    source = folder_pairs(tmp_path, num_classes=4, stem_pattern=ACDC_STEM_PATTERN)
    labeled, unlabeled = labeled_split(source, labeled_patients=["patient001"])

    def first_batches(seed):
        iterator = two_stream_iterator(source, labeled, unlabeled, image_size=16, seed=seed, labeled_batch_size=2,
                                       unlabeled_batch_size=2)
        return [next(iterator) for _ in range(4)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["labeled_image"], z["labeled_image"]) for x, z in zip(a, c))
    for batch in a:  # augmented labelled pairs stay aligned through the whole pipeline
        images = np.rint(batch["labeled_image"][..., 0] * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.stack([classes_of(i) for i in images]), batch["labeled_mask"])


@pytest.mark.skipif(not (ACDC / "split.json").is_file(), reason="ACDC not in ../shared/data/acdc")
def test_acdc_split_matches_ssl4mis():
    sources, labeled = acdc_splits(ACDC)
    assert {name: len(s) for name, s in sources.items()} == {"train": 1312, "val": 210, "test": 380}
    patients = {name: set(s.patients) for name, s in sources.items()}
    assert [len(patients[n]) for n in ("train", "val", "test")] == [70, 10, 20]
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    for count, slices in ((3, 68), (7, 136)):   # SSL4MIS's patients_to_slices for ACDC
        labeled_positions, rest = labeled_split(sources["train"], labeled_patients=labeled[count])
        assert len(labeled_positions) == slices and len(rest) == 1312 - slices
    assert len(volume_groups(sources["test"])) == 40
    record = sources["test"][0]
    assert record["image"].ndim == 2 and record["mask"].max() < 4


def test_volume_evaluation_zooms_each_slice_and_back(tmp_path):
    make_acdc_like(tmp_path, patients=1, frames=2, slices=3, size=(20, 24))
    source = folder_pairs(tmp_path, num_classes=4, stem_pattern=ACDC_STEM_PATTERN)
    calls = []

    def intensity_classes(batch):  # a 'network' that knows the rule the masks were drawn with
        calls.append(batch.shape)
        assert batch.dtype == np.float32 and 0.0 <= batch.min() and batch.max() <= 1.0
        return np.stack([classes_of(np.rint(image[..., 0] * 255).astype(np.uint8)) for image in batch])

    result = evaluate_volumes(intensity_classes, source, image_size=16, batch_size=2)
    assert set(calls) == {(2, 16, 16, 1)}                        # 3 slices per volume: padded to batches of 2
    assert sorted(result["volumes"]) == ["patient001_frame01", "patient001_frame02"] and len(result["slices"]) == 6
    for volume, positions in volume_groups(source).items():
        masks = np.stack([source[int(i)]["mask"] for i in positions])
        expected = np.stack([augment_lib.zoom_to(augment_lib.zoom_to(m, 16, 16), 20, 24) for m in masks])
        assert 0 < (expected != masks).mean() < 0.2              # the round trip through 16 px loses detail
        for name, values in class_scores(expected, masks, 4).items():
            np.testing.assert_allclose(result["volumes"][volume][name], values, err_msg=name)

    make_acdc_like(tmp_path / "square", patients=1, frames=1, slices=2, size=(24, 24))
    exact = evaluate_volumes(intensity_classes, folder_pairs(tmp_path / "square", num_classes=4,
                                                             stem_pattern=ACDC_STEM_PATTERN), image_size=24)
    assert len(exact["volumes"]) == 1 and len(exact["slices"]) == 2   # no zoom: every score is perfect
    assert all(exact["summary"][f"{level}/{name}/mean"] == value for level in ("volume", "slice")
               for name, value in (("dice", 1.0), ("iou", 1.0), ("hd95", 0.0)))
    background = evaluate_volumes(lambda batch: np.zeros(batch.shape[:3], np.uint8), source, image_size=16)
    assert background["summary"]["volume/dice/mean"] == 0.0 and background["summary"]["volume/hd95/mean"] == 0.0
    assert np.isnan(background["summary"]["slice/hd95/mean"])    # per slice, an empty prediction has no HD95
