"""`mode=segmentation` end to end on a tiny folder dataset: outputs, exact resume after kill -9, saved segmenters.

Test-sized networks (unet_ssl4mis_narrow, swin_unet_micro) at 64 px on 40x48 synthetic slices, so the masks must
be zoomed back to the images' own size.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cass_jax.port import load_variables
from cass_jax.segmentation import train as seg_train
from cass_jax.segmentation.data import read_image
from cass_jax.segmentation.segmenter import load_segmenter

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 48)
STEM_PATTERN = r"^(?P<volume>(?P<patient>p\d+)_v\d+)_s(?P<slice>\d+)$"


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy slice with a bright disc (class 1) and a mid-gray bar (class 2), and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    mask = np.zeros(SHAPE, np.uint8)
    top = rng.integers(2, 20)
    mask[top:top + 12, 4:14] = 2
    cy, cx = rng.integers(12, 28), rng.integers(20, 36)
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(25, 64)] = 1
    image = np.choose(mask, [30.0, 220.0, 130.0]) + 12 * rng.standard_normal(SHAPE)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def write_split(root: Path, patients: range) -> None:
    for p in patients:
        for s in range(1, 4):
            image, mask = phantom(100 * p + s)
            for folder, array in (("images", image), ("masks", mask)):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / f"p{p:02d}_v1_s{s}.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    for name, patients in (("train", range(0, 6)), ("val", range(6, 8)), ("test", range(8, 10))):
        write_split(root / name, patients)
    return root


def overrides(dataset: Path, **extra) -> list[str]:
    settings = {"data.format": "folder", "data.train": dataset / "train", "data.val": dataset / "val",
                "data.test": dataset / "test", "data.stem_pattern": STEM_PATTERN, "data.num_classes": 3,
                "data.class_names": "('background','disc','bar')", "labeled": "('fraction:0.5',)",
                "max_iterations": 24, "eval_every_steps": 8, "checkpoint_every_steps": 4, "log_every_steps": 4,
                **extra}
    return [f"--config.{key}={value}" for key, value in settings.items()]


def run_main(dataset: Path, workdir: Path, *extra: str, wait: bool = True, **settings):
    command = [sys.executable, "main.py", "--config=configs/seg_acdc.py:smoke", f"--workdir={workdir}",
               *overrides(dataset, **settings), *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("straight")
    result = run_main(dataset, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_results_hold_dice_iou_hd95_per_class_for_both_methods(straight_run):
    summary = json.loads((straight_run / "results.json").read_text())
    records = summary["records"]
    assert {(r["method"], r["network"]) for r in records} == {
        (m, n) for m in ("cross_teaching", "supervised") for n in ("cnn", "transformer")}
    for record in records:
        for metric in ("dice", "iou", "hd95"):
            for key in (f"volume/{metric}/class_1", f"volume/{metric}/class_2", f"volume/{metric}/mean",
                        f"slice/{metric}/mean"):
                assert key in record["test"], key
        assert 0.0 <= record["test"]["volume/dice/mean"] <= 1.0
    table = (straight_run / "results.md").read_text()
    assert "| cross_teaching | swin_unet_micro |" in table and "## Dice disc" in table


def test_tensorboard_has_losses_rampup_validation_and_pictures(straight_run):
    from tests.test_pretrain import read_events
    scalars, tags = read_events(straight_run / "runs" / "cross_teaching_fraction0.5_seed0")
    for tag in ("loss", "cnn/supervised_loss", "transformer/pseudo_label_loss", "consistency_weight",
                "learning_rate", "pseudo_label_agreement", "val/cnn/dice", "val/transformer/hd95"):
        assert tag in scalars, tag
    assert len(scalars["val/cnn/dice"]) == 3  # steps 8, 16, 24
    assert {"validation_predictions", "augmented_labeled"} <= tags


def test_predicted_masks_have_the_images_sizes_and_only_class_values(straight_run, dataset):
    masks = sorted((straight_run / "runs" / "cross_teaching_fraction0.5_seed0" / "masks" / "transformer").glob("*.png"))
    assert [m.name for m in masks] == sorted(p.name for p in (dataset / "test" / "images").glob("*.png"))
    for path in masks:
        values = np.asarray(Image.open(path))
        assert values.shape == SHAPE and values.dtype == np.uint8 and values.max() < 3


def test_saved_segmenter_reproduces_the_run_masks(straight_run, dataset):
    run_dir = straight_run / "runs" / "supervised_fraction0.5_seed0"
    segmenter = load_segmenter(run_dir / "models" / "cnn")
    assert segmenter.info["method"] == "supervised" and segmenter.info["num_classes"] == 3
    paths = sorted((dataset / "test" / "images").glob("*.png"))[:3]
    for path, mask in zip(paths, segmenter([read_image(p) for p in paths])):
        np.testing.assert_array_equal(mask, np.asarray(Image.open(run_dir / "masks" / "cnn" / path.name)))


def test_resume_after_kill_9_gives_identical_weights(straight_run, dataset, tmp_path):
    workdir = tmp_path / "killed"
    process = run_main(dataset, workdir, wait=False)
    checkpoints = workdir / "runs" / "cross_teaching_fraction0.5_seed0" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "12").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (workdir / "results.json").exists()
    result = run_main(dataset, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from the checkpoint" in result.stderr
    for run in ("cross_teaching_fraction0.5_seed0", "supervised_fraction0.5_seed0"):
        for network in ("cnn", "transformer"):
            a = load_variables(straight_run / "runs" / run / "models" / network / "variables.msgpack")
            b = load_variables(workdir / "runs" / run / "models" / network / "variables.msgpack")
            jax.tree.map(np.testing.assert_array_equal, a, b)
    straight = json.loads((straight_run / "results.json").read_text())["records"]
    resumed = json.loads((workdir / "results.json").read_text())["records"]
    assert [r["test"] for r in straight] == [r["test"] for r in resumed]


def test_run_plan_and_labelled_settings(dataset):
    config = seg_train_config(methods=("cross_teaching", "fully_supervised", "supervised_resnet_unet"),
                              labeled=("patients:7", "fraction:0.1"), seeds=(0, 1))
    runs = seg_train.planned_runs(config)
    assert [r.name for r in runs][:3] == ["cross_teaching_patients7_seed0", "cross_teaching_patients7_seed1",
                                          "cross_teaching_fraction0.1_seed0"]
    assert [r.labeled for r in runs if r.method == "fully_supervised"] == ["all", "all"]
    resnet = seg_train.method_config(config, runs[-1])
    assert resnet.transformer == "" and not resnet.cross_teaching and resnet.unlabeled_batch_size == 0
    with pytest.raises(ValueError, match="config.methods has 'mean_teacher'"):
        seg_train.planned_runs(seg_train_config(methods=("mean_teacher",)))
    with pytest.raises(ValueError, match="patients:5"):
        seg_train.labeled_indices(None, "patients:5", {3: [], 7: []}, 0)


def seg_train_config(**values):
    import configs.seg_acdc
    config = configs.seg_acdc.get_config()
    for key, value in values.items():
        config[key] = value
    return config


def test_results_table_shows_mean_std_and_interval():
    records = [{"method": "cross_teaching", "model": "m", "labeled": "patients:7",
                "test": {"volume/dice/mean": v, "volume/iou/mean": v, "volume/hd95/mean": v,
                         "volume/dice/class_1": v}} for v in (0.5, 0.6, 0.7)]
    table = seg_train.results_table(records, ("background", "rv"))
    # mean 0.6, std 0.1, t(0.975, 2) = 4.3027 -> half width 0.2484
    assert "| cross_teaching | m | 0.6000 +- 0.1000 [0.3516, 0.8484] (n=3) |" in table


def test_segment_mode_writes_masks_for_new_images_and_skips_unreadable_ones(straight_run, dataset, tmp_path):
    from cass_jax.segmentation.predict import default_segment_config, run_segment
    inputs = tmp_path / "new"
    (inputs / "nested").mkdir(parents=True)
    images = sorted((dataset / "test" / "images").glob("*.png"))[:2]
    (inputs / images[0].name).write_bytes(images[0].read_bytes())
    (inputs / "nested" / images[1].name).write_bytes(images[1].read_bytes())
    (inputs / "broken.png").write_bytes(b"not an image")
    config = default_segment_config()
    model = straight_run / "runs" / "cross_teaching_fraction0.5_seed0" / "models" / "transformer"
    config.model, config.input, config.overlays = str(model), str(inputs), True
    summary = run_segment(config, tmp_path / "out")
    assert summary["images"] == 2 and summary["errors"] == 1
    run_masks = straight_run / "runs" / "cross_teaching_fraction0.5_seed0" / "masks" / "transformer"
    for written, image in ((tmp_path / "out" / "masks" / images[0].name, images[0]),
                           (tmp_path / "out" / "masks" / "nested" / images[1].name, images[1])):
        np.testing.assert_array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(run_masks / image.name)))
        assert (tmp_path / "out" / "overlays" / written.relative_to(tmp_path / "out" / "masks")).is_file()
    errors = (tmp_path / "out" / "errors.csv").read_text().splitlines()
    assert len(errors) == 2 and "broken.png" in errors[1]


def test_bad_inputs_stop_with_one_line_errors(dataset, tmp_path):
    broken = tmp_path / "broken"
    for split in ("train", "val", "test"):
        for folder in ("images", "masks"):
            (broken / split / folder).mkdir(parents=True)
            for path in (dataset / split / folder).glob("*.png"):
                (broken / split / folder / path.name).write_bytes(path.read_bytes())
    bad_mask = broken / "val" / "masks" / "p06_v1_s2.png"
    values = np.asarray(Image.open(bad_mask)).copy()
    values[0, 0] = 5
    Image.fromarray(values).save(bad_mask)
    result = run_main(broken, tmp_path / "run")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "p06_v1_s2.png" in last and "class value 5" in last, last

    result = run_main(dataset, tmp_path / "run2", **{"network.image_size": 100})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "img_size=100" in last and "nearest valid sizes" in last, last
