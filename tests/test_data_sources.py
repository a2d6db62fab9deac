"""Sources, splits and label fractions: counts, determinism, leakage, multi-label CSVs, clear errors."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cass_jax.data import (
    DataError,
    csv_source,
    default_data_config,
    folder_sources,
    label_fraction_indices,
    load_splits,
    synthetic_phantom,
)
from cass_jax.data.sources import SyntheticSource

BRAIN_MRI_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain_mri_small"
needs_brain_mri = pytest.mark.skipif(not BRAIN_MRI_SMALL.is_dir(), reason="../shared/data/brain_mri_small absent")


def _write_jpeg(path: Path, seed: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _folder_dataset(root: Path, per_class: int = 6, classes=("a", "b", "c"), splits=("Training", "Testing")):
    seed = 0
    for split in splits:
        for name in classes:
            for i in range(per_class):
                _write_jpeg(root / split / name / f"{i:03d}.jpg", seed)
                seed += 1
    return root


def _folder_config(root) -> "default_data_config":
    config = default_data_config()
    config.source = "folder"
    config.path = str(root)
    return config


# ---- synthetic phantoms -------------------------------------------------------------------------


def test_synthetic_is_deterministic_balanced_and_split_80_10_10():
    a = synthetic_phantom(5, seed=1, size=64)
    np.testing.assert_array_equal(a, synthetic_phantom(5, seed=1, size=64))
    assert not np.array_equal(a, synthetic_phantom(5, seed=2, size=64))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    config = default_data_config()
    config.synthetic_num_images, config.synthetic_size = 200, 32
    splits = load_splits(config)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 20, 20)
    assert np.bincount(np.concatenate([s.labels for s in (splits.train, splits.val, splits.test)])).tolist() == [50] * 4
    again = load_splits(config)
    assert splits.test.ids == again.test.ids
    record = splits.train[0]
    assert record["image"].shape == (32, 32, 3) and isinstance(record["label"], int) and record["id"]


def test_synthetic_is_not_trivial_for_a_linear_probe_on_random_features():
    from sklearn.linear_model import RidgeClassifier

    source = SyntheticSource(400, 64, seed=0)
    images = np.stack([source[i]["image"][..., 0] for i in range(len(source))]).astype(np.float32) / 255.0
    pixels = images.reshape(len(images), -1)
    labels = source.labels
    # Random-init "network": a fixed random projection with ReLU; a linear probe on it must not be perfect.
    weights = np.random.default_rng(0).normal(size=(pixels.shape[1], 256)).astype(np.float32) / 64.0
    features = np.maximum(pixels @ weights, 0)
    random_probe = RidgeClassifier().fit(features[:300], labels[:300]).score(features[300:], labels[300:])
    assert random_probe < 0.9, random_probe
    # The classes do differ in the pixels: a probe on raw pixels is above chance (0.25); all data are seeded.
    pixel_probe = RidgeClassifier().fit(pixels[:300], labels[:300]).score(pixels[300:], labels[300:])
    assert pixel_probe > 0.35, pixel_probe


def test_lesion_contrast_and_scale_keep_todays_phantoms_by_default_and_make_the_demo_learnable():
    from sklearn.linear_model import RidgeClassifier

    default = np.stack([synthetic_phantom(i, seed=0, size=64) for i in range(4)])
    # The phantoms before the two settings existed (other tests and the README's numbers depend on them).
    assert hashlib.sha256(default.tobytes()).hexdigest() == (
        "853d4ad6d72a2b3e7f48641355a9eba2a2d95ef5895f9e4600b8c3cbf5720fa8")
    boosted = np.stack([synthetic_phantom(i, seed=0, size=64, contrast=3.0, lesion_scale=2.0) for i in range(4)])
    assert [np.array_equal(a, b) for a, b in zip(default, boosted)] == [False, False, True, False]  # notumor: no lesion
    config = default_data_config()
    config.synthetic_num_images, config.synthetic_size = 400, 64
    config.synthetic_contrast, config.synthetic_lesion_scale = 3.0, 2.0
    source = load_splits(config).train_full
    with_lesion = int(np.flatnonzero(source.labels != 2)[0])
    np.testing.assert_array_equal(source[with_lesion]["image"], synthetic_phantom(
        int(source.rows[with_lesion]), size=64, contrast=3.0, lesion_scale=2.0))
    # Brighter, larger lesions: a grey-level histogram (16 bins) now tells the classes apart (0.31 by default).
    histograms = np.stack([np.histogram(source[i]["image"][..., 0], bins=16, range=(0, 256))[0]
                           for i in range(len(source))])
    labels = source.labels
    half = len(source) // 2
    score = RidgeClassifier().fit(histograms[:half], labels[:half]).score(histograms[half:], labels[half:])
    assert score > 0.45, score


# ---- class folders ------------------------------------------------------------------------------


@needs_brain_mri
def test_brain_mri_small_counts_and_splits():
    splits = load_splits(_folder_config(BRAIN_MRI_SMALL))
    assert splits.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 100)
    assert np.bincount(splits.test.labels).tolist() == [25] * 4
    train_val = np.concatenate([splits.train.labels, splits.val.labels])
    assert np.bincount(train_val).tolist() == [100] * 4
    assert not set(splits.train.ids) & set(splits.val.ids)
    assert all(i.startswith("Testing/") for i in splits.test.ids)
    every = splits.train_full.ids + splits.val.ids + splits.test.ids
    contents = {(BRAIN_MRI_SMALL / i).read_bytes() for i in every}
    assert len(every) == len(contents) == 500  # no file, and no identical content, in two splits
    record = splits.test[0]
    assert record["image"].shape == (224, 224, 3) and record["image"].dtype == np.uint8


def test_plain_class_folders_without_split_folders(tmp_path):
    root = _folder_dataset(tmp_path / "d", per_class=10, splits=("",))
    config = _folder_config(root)
    splits = load_splits(config)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 3, 3)
    assert splits.class_names == ["a", "b", "c"]
    every = splits.train.ids + splits.val.ids + splits.test.ids
    assert len(set(every)) == 30
    config.split_seed = 1
    assert load_splits(config).test.ids != splits.test.ids


def test_duplicates_never_cross_splits(tmp_path, caplog):
    root = _folder_dataset(tmp_path / "d")
    # Two training copies of a test image, one training copy of another training image.
    (root / "Training/a/dup_of_test.jpg").write_bytes((root / "Testing/a/000.jpg").read_bytes())
    (root / "Training/b/dup2_of_test.jpg").write_bytes((root / "Testing/a/000.jpg").read_bytes())
    (root / "Training/c/dup_of_train.jpg").write_bytes((root / "Training/c/001.jpg").read_bytes())
    with caplog.at_level(logging.WARNING):
        splits = load_splits(_folder_config(root))
    assert "2 groups of identical image files" in caplog.text
    # The group with conflicting labels (a and b) is dropped whole; the same-label pair keeps one copy.
    assert "Testing/a/000.jpg" not in splits.test.ids
    every = splits.train_full.ids + splits.val.ids + splits.test.ids
    assert "Training/a/dup_of_test.jpg" not in every
    assert ("Training/c/001.jpg" in every) != ("Training/c/dup_of_train.jpg" in every)
    digests = [hash(Path(root, i).read_bytes()) for i in every]
    assert len(digests) == len(set(digests))


def test_duplicate_with_same_label_keeps_the_test_copy(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    (root / "Training/a/copy.jpg").write_bytes((root / "Testing/a/002.jpg").read_bytes())
    splits = load_splits(_folder_config(root))
    assert "Testing/a/002.jpg" in splits.test.ids
    assert "Training/a/copy.jpg" not in splits.train_full.ids + splits.val.ids


def test_missing_dataset_dir_says_where_to_download(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*kaggle.com.*Training/ and Testing/"):
        load_splits(_folder_config(tmp_path / "nowhere"))


def test_empty_class_folder_is_named(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    (root / "Training" / "empty").mkdir()
    with pytest.raises(DataError, match=r"Training/empty contains no images"):
        folder_sources(str(root))


def test_test_class_unknown_to_training_is_an_error(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    _write_jpeg(root / "Testing" / "zebra" / "0.jpg", 99)
    with pytest.raises(DataError, match=r"\['zebra'\]"):
        folder_sources(str(root))


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_corrupt_images_are_errors_or_skipped(tmp_path, kind, caplog):
    root = _folder_dataset(tmp_path / "d")
    bad = root / "Training" / "b" / "bad.jpg"
    if kind == "truncated":
        data = (root / "Training" / "b" / "000.jpg").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("this is not an image")
    config = _folder_config(root)
    with pytest.raises(DataError, match=r"bad\.jpg.*skip_corrupt"):
        load_splits(config)
    config.skip_corrupt = True
    with caplog.at_level(logging.WARNING):
        splits = load_splits(config)
    assert "Dropped 1 corrupt image" in caplog.text
    assert "Training/b/bad.jpg" not in splits.train_full.ids + splits.val.ids
    assert len(splits.train_full) + len(splits.val) == 18


def test_truncated_image_fails_to_decode_with_its_name(tmp_path):
    root = _folder_dataset(tmp_path / "d")
    path = root / "Training" / "a" / "000.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = folder_sources(str(root))["train"]
    with pytest.raises(ValueError, match=r"000\.jpg.*truncated"):
        source[0]


# ---- CSV ----------------------------------------------------------------------------------------


def _images(folder: Path, names) -> None:
    for i, name in enumerate(names):
        _write_jpeg(folder / name, i)


def test_csv_class_name_column(tmp_path):
    _images(tmp_path / "img", ["x1.jpg", "x2.jpg", "x3.jpg"])
    table = tmp_path / "labels.csv"
    table.write_text("image_name,diagnosis\nx2,nevus\nx1,melanoma\nx3,nevus\n")
    source = csv_source(str(table), image_column="image_name", image_dir=str(tmp_path / "img"))
    assert source.class_names == ["melanoma", "nevus"]
    assert source.ids == ["x1.jpg", "x2.jpg", "x3.jpg"]
    assert source.labels.tolist() == [0, 1, 1]
    assert source[0]["image"].shape == (32, 32, 3)


def test_csv_one_hot_isic_layout(tmp_path):
    _images(tmp_path, ["ISIC_0000000.jpg", "ISIC_0000001.jpg"])
    table = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    table.write_text(
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_0000000,0.0,1.0,0,0,0,0,0,0,0\nISIC_0000001,1,0,0,0,0,0,0,0,0\n"
    )
    source = csv_source(str(table))
    assert source.class_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert source.labels.tolist() == [1, 0]


def test_csv_multi_label_indicator_and_list_columns(tmp_path):
    _images(tmp_path, ["p1.png", "p2.png", "p3.png"])
    indicator = tmp_path / "indicator.csv"
    indicator.write_text("image,b,tfh,tfh217,tfhl,other\np1.png,1,1,0,0,0\np2.png,0,0,0,0,1\np3.png,0,1,1,1,0\n")
    source = csv_source(str(indicator), multi_label=True)
    assert source.multi_label and source.class_names == ["b", "tfh", "tfh217", "tfhl", "other"]
    np.testing.assert_array_equal(source.labels, [[1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 0]])
    record = source[2]
    assert record["label"].dtype == np.float32 and record["label"].tolist() == [0, 1, 1, 1, 0]
    listed = tmp_path / "listed.csv"
    listed.write_text("image,cells\np1.png,b;tfh\np2.png,other\np3.png,tfh;tfh217;tfhl\n")
    names = ("b", "tfh", "tfh217", "tfhl", "other")
    source = csv_source(str(listed), multi_label=True, class_names=names)
    np.testing.assert_array_equal(source.labels, [[1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 0]])
    with pytest.raises(DataError, match="exactly one 1"):
        csv_source(str(indicator))


def test_csv_errors_name_the_row_and_value(tmp_path):
    _images(tmp_path, ["a.jpg"])
    missing = tmp_path / "missing.csv"
    missing.write_text("image,label\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(DataError, match=r"line 3: .*b\.jpg.*data\.image_dir"):
        csv_source(str(missing))
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("image,label\na.jpg,zebra\n")
    with pytest.raises(DataError, match=r"line 2: unknown label 'zebra'"):
        csv_source(str(unknown), class_names=("cat", "dog"))
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text("image,MEL,NV\na.jpg,1,yes\n")
    with pytest.raises(DataError, match=r"line 2: column 'NV' has value 'yes'"):
        csv_source(str(bad_value))
    with pytest.raises(DataError, match="no image column 'file'"):
        csv_source(str(unknown), image_column="file")


# ---- label fractions ----------------------------------------------------------------------------


def test_label_fraction_sizes_seeds_and_stratification():
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    for fraction, size in ((1.0, 1000), (0.1, 100), (0.01, 10)):
        picked = label_fraction_indices(labels, fraction, seed=0)
        assert len(picked) == size and len(np.unique(picked)) == size
    a = label_fraction_indices(labels, 0.01, seed=0)
    np.testing.assert_array_equal(a, label_fraction_indices(labels, 0.01, seed=0))
    assert not np.array_equal(a, label_fraction_indices(labels, 0.01, seed=1))
    strat = label_fraction_indices(labels, 0.01, seed=0, mode="stratified")
    assert np.bincount(labels[strat], minlength=4).tolist() == [5, 3, 1, 1]
    tiny = label_fraction_indices(labels, 0.002, seed=3, mode="stratified")
    assert set(labels[tiny]) == {0, 1, 2, 3}
    multi = np.zeros((200, 5), np.float32)
    multi[:, 0] = 1
    multi[7, 4] = multi[9, 3] = 1
    picked = label_fraction_indices(multi, 0.02, seed=0, mode="stratified")
    assert 7 in picked and 9 in picked
    with pytest.raises(ValueError, match="label_fraction"):
        label_fraction_indices(labels, 0.0, seed=0)


def test_load_splits_label_fraction_applies_to_train_only():
    config = default_data_config()
    config.synthetic_num_images, config.synthetic_size = 200, 32
    config.label_fraction, config.label_fraction_mode = 0.1, "stratified"
    splits = load_splits(config)
    assert len(splits.train) == 16 and len(splits.train_full) == 160 and len(splits.test) == 20
    assert set(splits.train.ids) <= set(splits.train_full.ids)
    assert set(splits.train.labels.tolist()) == {0, 1, 2, 3}
    other = load_splits(config, label_fraction_seed=5)
    assert other.train.ids != splits.train.ids and other.test.ids == splits.test.ids


def test_stratified_split_holds_out_each_class_share_seeded_and_disjoint(tmp_path):
    seed = 0
    for name, count in (("a", 20), ("b", 10), ("c", 5)):  # plain class folders, no test split of their own
        for i in range(count):
            _write_jpeg(tmp_path / name / f"{i:03d}.jpg", seed)
            seed += 1
    config = _folder_config(tmp_path)
    config.split_mode, config.val_fraction, config.test_fraction = "stratified", 0.2, 0.2
    splits = load_splits(config)
    assert np.bincount(splits.test.labels).tolist() == [4, 2, 1]
    assert np.bincount(splits.val.labels).tolist() == [4, 2, 1]
    assert np.bincount(splits.train.labels).tolist() == [12, 6, 3]
    ids = [set(s.ids) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert load_splits(config).test.ids == splits.test.ids
    config.split_seed = 78
    assert load_splits(config).test.ids != splits.test.ids
    config.split_mode = "by_patient"
    with pytest.raises(DataError, match="split_mode must be 'random' or 'stratified', got 'by_patient'"):
        load_splits(config)
