"""grain loaders: determinism, epochs, sharding, exact evaluation, resumable state, workers."""

from pathlib import Path

import numpy as np
import pytest

from cass_jax.data import (
    default_data_config,
    eval_iterator,
    folder_sources,
    load_splits,
    steps_per_epoch,
    train_iterator,
)

BRAIN_MRI_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain_mri_small"


class IndexSource:
    """Example i is an 8x8 image filled with value i, so batches reveal which examples they hold."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 3, "id": str(i)}


def _config(image_size: int = 8):
    config = default_data_config()
    config.image_size = image_size
    config.mean, config.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # images stay x / 255
    return config


def _indices(batch) -> list[int]:
    return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int).tolist()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _synthetic_splits(num_images=64, size=32):
    config = default_data_config()
    config.synthetic_num_images, config.synthetic_size, config.image_size = num_images, size, size
    return config, load_splits(config)


def test_train_batches_are_deterministic_and_seeded():
    config, splits = _synthetic_splits()
    a = _take(train_iterator(splits.train, config, batch_size=8, seed=0, augment=True), 8)
    b = _take(train_iterator(splits.train, config, batch_size=8, seed=0, augment=True), 8)
    c = _take(train_iterator(splits.train, config, batch_size=8, seed=1, augment=True), 8)
    assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (8,) and a[0]["label"].dtype.kind == "i"
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # ImageNet normalisation of [0, 1] pixels.
    assert a[0]["image"].min() >= -2.2 and a[0]["image"].max() <= 2.7


def test_epochs_are_reshuffled_permutations_with_remainder_dropped():
    source = IndexSource(23)
    iterator = train_iterator(source, _config(), batch_size=5, seed=3, augment=False)
    assert steps_per_epoch(23, 5) == 4
    epochs = [sum((_indices(b) for b in _take(iterator, 4)), []) for _ in range(3)]
    for epoch in epochs:
        assert len(epoch) == 20 and len(set(epoch)) == 20 and set(epoch) <= set(range(23))
    assert epochs[0] != epochs[1] != epochs[2]


def test_processes_read_disjoint_parts_of_each_global_batch_with_the_same_augmentation():
    config, splits = _synthetic_splits()
    whole = _take(train_iterator(splits.train, config, batch_size=8, seed=5, augment=True), 6)
    shards = [
        _take(train_iterator(splits.train, config, batch_size=4, seed=5, augment=True, shard_index=i, shard_count=2), 6)
        for i in range(2)
    ]
    for step, batch in enumerate(whole):
        np.testing.assert_array_equal(batch["image"][0::2], shards[0][step]["image"])
        np.testing.assert_array_equal(batch["image"][1::2], shards[1][step]["image"])
    ids = IndexSource(40)
    parts = [
        _indices(
            next(train_iterator(ids, _config(), batch_size=4, seed=0, augment=False, shard_index=i, shard_count=3))
        )
        for i in range(3)
    ]
    assert len(set(sum(parts, []))) == 12


def test_iterator_state_resumes_mid_epoch_exactly():
    config, splits = _synthetic_splits()
    iterator = train_iterator(splits.train, config, batch_size=8, seed=0, augment=True)
    _take(iterator, 4)
    state = iterator.get_state()
    expected = _take(iterator, 5)  # crosses the epoch boundary (6 batches per epoch)
    resumed = train_iterator(splits.train, config, batch_size=8, seed=0, augment=True)
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 5)):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_iterator_state_round_trips_through_orbax(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    source = IndexSource(30)
    iterator = train_iterator(source, _config(), batch_size=4, seed=1, augment=False)
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = [_indices(b) for b in _take(iterator, 4)]
    fresh = train_iterator(source, _config(), batch_size=4, seed=1, augment=False)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert [_indices(b) for b in _take(fresh, 4)] == expected


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_yields_every_example_once_with_masks(shard_count):
    source = IndexSource(13)
    seen, masks = [], []
    for shard in range(shard_count):
        batches = list(eval_iterator(source, _config(), batch_size=4, shard_index=shard, shard_count=shard_count))
        assert len(batches) == (4 if shard_count == 1 else 2)
        for batch in batches:
            assert batch["mask"].dtype == np.bool_ and batch["image"].shape == (4, 8, 8, 3)
            seen += [i for i, m in zip(_indices(batch), batch["mask"]) if m]
            masks += batch["mask"].tolist()
    assert sorted(seen) == list(range(13))
    assert sum(masks) == 13 and len(masks) == 16


def test_eval_labels_follow_the_examples():
    config, splits = _synthetic_splits(num_images=40)
    labels = np.concatenate([b["label"][b["mask"]] for b in eval_iterator(splits.test, config, batch_size=3)])
    np.testing.assert_array_equal(labels, splits.test.labels)


def test_multi_label_batches_carry_float_vectors(tmp_path):
    from PIL import Image

    from cass_jax.data import csv_source

    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = "".join(f"{i}.png,{i % 2},{(i + 1) % 2},1\n" for i in range(6))
    (tmp_path / "labels.csv").write_text("image,b,tfh,other\n" + rows)
    source = csv_source(str(tmp_path / "labels.csv"), multi_label=True)
    batch = next(train_iterator(source, _config(16), batch_size=4, seed=0, augment=True))
    assert batch["label"].shape == (4, 3) and batch["label"].dtype == np.float32
    assert (batch["label"][:, 2] == 1).all() and (batch["label"][:, :2].sum(1) == 1).all()
    batches = list(eval_iterator(source, _config(16), batch_size=4))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, source.labels)


def test_two_worker_processes_give_the_same_batches_as_in_process():
    config, splits = _synthetic_splits()
    expected = _take(train_iterator(splits.train, config, batch_size=8, seed=2, augment=True), 4)
    config.workers = 2
    iterator = train_iterator(splits.train, config, batch_size=8, seed=2, augment=True)
    try:
        got = _take(iterator, 4)
    finally:
        iterator.close()
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_worker_processes_under_an_absl_main(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "main.py"
    script.write_text(
        "from absl import app\n"
        "from cass_jax.data import default_data_config, load_splits, train_iterator\n"
        "def main(argv):\n"
        "  c = default_data_config()\n"
        "  c.synthetic_num_images, c.synthetic_size, c.image_size, c.workers = 40, 32, 32, 2\n"
        "  it = train_iterator(load_splits(c).train, c, batch_size=4, seed=0, augment=True)\n"
        "  print('batch', next(it)['image'].shape)\n"
        "  it.close()\n"
        "if __name__ == '__main__':\n"
        "  app.run(main)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch (4, 32, 32, 3)" in result.stdout


def test_too_small_a_dataset_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        train_iterator(IndexSource(5), _config(), batch_size=4, seed=0, augment=False, shard_count=2)


@pytest.mark.skipif(not BRAIN_MRI_SMALL.is_dir(), reason="../shared/data/brain_mri_small absent")
def test_tfds_builder_and_source_match_the_folder_layout(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from cass_jax.data.tfds_brain_mri import BrainTumorMri

    builder = BrainTumorMri(data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(BRAIN_MRI_SMALL)), file_format="array_record"
    )
    config = default_data_config()
    config.source, config.path, config.tfds_data_dir = "tfds", "brain_tumor_mri", str(tmp_path)
    splits = load_splits(config)
    assert splits.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 100)
    assert np.bincount(splits.test.labels).tolist() == [25] * 4
    assert splits.test[0]["image"].shape == (224, 224, 3)
    assert all(i.startswith("Testing/") for i in splits.test.ids)
    record = splits.test[0]
    np.testing.assert_array_equal(record["image"], folder_sources(str(BRAIN_MRI_SMALL))["test"].subset([0])[0]["image"])
    assert record["id"] == "Testing/glioma/" + sorted((BRAIN_MRI_SMALL / "Testing" / "glioma").iterdir())[0].name
    config.image_size = 64
    batch = next(train_iterator(splits.train, config, batch_size=4, seed=0, augment=True))
    assert batch["image"].shape == (4, 64, 64, 3)
