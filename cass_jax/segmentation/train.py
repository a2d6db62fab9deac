"""`mode=segmentation`: cross teaching and its supervised baselines over labelled settings and seeds, one table.

Each run (method x labelled setting x seed) trains in the shared loop (cass_jax.training_loop: checkpoints, exact
resume, TensorBoard, progress, NaN stop) under `<workdir>/runs/<run>/`, keeps each network's best weights by
validation Dice (SSL4MIS evaluates every 200 iterations and tests the best), scores them on the test split per 3D
volume and per 2D slice, writes the predicted masks as PNGs and the networks as saved segmenters. A finished run
is reused; `results.json` and `results.md` gather every run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from cass_jax import parallel
from cass_jax.port import load_variables, save_variables
from cass_jax.reporting import create_writer, flat_hparams
from cass_jax.segmentation import data as seg_data
from cass_jax.segmentation.augment import resize_pair
from cass_jax.segmentation.cross_teaching import (CrossTeaching, CrossTeachingConfig, CrossTeachingState,
                                                  predict_labels)
from cass_jax.segmentation.evaluation import evaluate_volumes
from cass_jax.segmentation.figures import prediction_grid, write_mask_png
from cass_jax.segmentation.loader import images_to_float, two_stream_iterator
from cass_jax.segmentation.losses import consistency_weight
from cass_jax.metrics import mean_confidence_interval
from cass_jax.segmentation.segmenter import save_segmenter
from cass_jax.training_loop import LoopHooks, LoopSettings, run_loop

# method -> (networks trained, cross teaching?). "supervised*" runs see the labelled images only.
METHODS = {
    "cross_teaching": ("pair", True),
    "supervised": ("pair", False),
    "fully_supervised": ("pair", False),
    "supervised_resnet_unet": ("resnet_unet", False),
}
ALL_LABELED = "all"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a method, a labelled setting ("patients:7", "fraction:0.1" or "all") and a seed."""

    method: str
    labeled: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_{self.labeled.replace(':', '')}_seed{self.seed}"


def planned_runs(config: ml_collections.ConfigDict) -> list[Run]:
    """Every (method, labelled setting, seed); the fully supervised upper bound runs once per seed on all masks."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"config.methods has {unknown[0]!r}; use some of {', '.join(METHODS)}.")
    runs = []
    for method in config.methods:
        settings = (ALL_LABELED,) if method == "fully_supervised" else tuple(config.labeled)
        runs += [Run(method, labeled, int(seed)) for labeled in settings for seed in config.seeds]
    return runs


def load_sources(config: ml_collections.ConfigDict) -> tuple[dict[str, seg_data.SegmentationSource], dict[int, list]]:
    """{"train", "val", "test"} sources and the dataset's named labelled-patient settings (ACDC's 3 and 7)."""
    data = config.data
    if data.format == "acdc":
        return seg_data.acdc_splits(data.path)
    if data.format in ("folder", "csv"):
        splits = {}
        for name in ("train", "val", "test"):
            location = data[name]
            if not location:
                raise ValueError(f"config.data.{name} is empty: give the {name} folder (images/ and masks/) or CSV.")
            splits[name] = (seg_data.folder_pairs(location, data.num_classes, stem_pattern=data.stem_pattern or None,
                                                  channels=data.channels) if data.format == "folder" else
                            seg_data.csv_pairs(location, data.num_classes, channels=data.channels))
        return splits, {}
    raise ValueError(f"config.data.format={data.format!r}; use acdc, folder or csv.")


def labeled_indices(source: seg_data.SegmentationSource, labeled: str, named_patients: dict[int, list],
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, unlabelled) positions in the training source for a setting: patients:N, fraction:F or all."""
    if labeled == ALL_LABELED:
        return np.arange(len(source)), np.zeros(0, np.int64)
    kind, _, value = labeled.partition(":")
    if kind == "patients":
        count = int(value)
        if count not in named_patients:
            raise ValueError(f"Labelled setting {labeled!r}: the dataset names labelled patients only for "
                             f"{sorted(named_patients) or 'no setting'}; use one of those or fraction:F.")
        return seg_data.labeled_split(source, labeled_patients=named_patients[count])
    if kind == "fraction":
        return seg_data.labeled_split(source, labeled_fraction=float(value), seed=seed)
    raise ValueError(f"Labelled setting {labeled!r}: use patients:N, fraction:F or all.")


def method_config(config: ml_collections.ConfigDict, run: Run) -> CrossTeachingConfig:
    """The step's settings for a run: its networks, cross teaching or not, and the shared optimisation recipe."""
    networks, cross_teaching = METHODS[run.method]
    network = config.network
    if networks == "pair":
        models = dict(cnn=network.cnn, cnn_init=network.cnn_init, transformer=network.transformer,
                      transformer_init=network.transformer_init)
    else:
        models = dict(cnn=network.resnet_unet, cnn_init=network.resnet_unet_init, transformer="")
    return CrossTeachingConfig(
        **models, num_classes=config.data.num_classes, image_size=network.image_size,
        in_channels=config.data.channels, dtype=config.dtype, base_lr=config.optim.base_lr,
        momentum=config.optim.momentum, weight_decay=config.optim.weight_decay, poly_power=config.optim.poly_power,
        max_iterations=config.max_iterations, consistency=config.consistency,
        consistency_rampup=config.consistency_rampup, rampup_every=config.rampup_every,
        labeled_batch_size=config.labeled_batch_size,
        unlabeled_batch_size=config.unlabeled_batch_size if cross_teaching else 0, cross_teaching=cross_teaching)


class BestWeights:
    """Each network's variables at its best validation Dice so far, kept in `directory` (survives a resume)."""

    def __init__(self, directory: Path):
        self.directory = directory
        path = directory / "best.json"
        self.scores: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def offer(self, name: str, step: int, dice: float, variables: dict) -> bool:
        """Keeps `variables` when `dice` beats the best so far (NaN never does); True when kept."""
        if not np.isfinite(dice) or (name in self.scores and dice <= self.scores[name]["dice"]):
            return False
        save_variables(self.directory / f"{name}.msgpack", jax.device_get(variables))
        self.scores[name] = {"step": step, "dice": float(dice)}
        (self.directory / "best.json").write_text(json.dumps(self.scores, indent=2))
        return True

    def variables(self, name: str) -> dict | None:
        return load_variables(self.directory / f"{name}.msgpack") if name in self.scores else None


class SegmentationHooks(LoopHooks):
    """Validation every `eval_every_steps` (Dice to TensorBoard and the console, best weights kept) and a picture
    of image / reference / each network's prediction on a few validation slices."""

    def __init__(self, method: CrossTeaching, config: ml_collections.ConfigDict, validation: seg_data.SegmentationSource,
                 best: BestWeights, steps_per_epoch: int):
        self.method, self.config, self.validation, self.best = method, config, validation, best
        self.steps_per_epoch = steps_per_epoch
        picture_rows = np.linspace(0, len(validation) - 1, min(config.picture_images, len(validation))).astype(int)
        self.picture_records = [validation[int(i)] for i in picture_rows]

    def first_batch(self, batch, writer) -> None:
        labeled = np.asarray(batch["labeled_image"])[:4]
        writer.write_images(0, {"augmented_labeled": prediction_grid(
            labeled, np.asarray(batch["labeled_mask"])[:4], {})[None]})

    def scalars(self, step: int, state: CrossTeachingState) -> dict[str, float]:
        return {"epoch": step / self.steps_per_epoch}

    def periodic(self, step: int, state: CrossTeachingState, writer) -> None:
        total = self.config.max_iterations
        if step % self.config.eval_every_steps and step != total:
            return
        results = self.method.evaluate(state, self.validation, batch_size=self.config.eval_batch_size,
                                       slice_scores=False)
        scalars = {}
        for name, result in results.items():
            summary = result["summary"]
            for key in ("volume/dice/mean", "volume/iou/mean", "volume/hd95/mean"):
                scalars[f"val/{name}/{key.split('/')[1]}"] = summary[key]
            self.best.offer(name, step, summary["volume/dice/mean"], self.method.backbones(state)[name])
        writer.write_scalars(step, scalars)
        writer.write_images(step, {"validation_predictions": self.picture(state)[None]})
        logging.info("validation at step %d: %s", step, " | ".join(
            f"{name} Dice {scalars[f'val/{name}/dice']:.4f}" for name in results))

    def picture(self, state: CrossTeachingState) -> np.ndarray:
        size = self.config.network.image_size
        pairs = [resize_pair(r["image"], r["mask"], size) for r in self.picture_records]
        images = images_to_float([p["image"] for p in pairs])
        predictions = {}
        for name, variables in self.method.backbones(state).items():
            model = self.method.networks.module(name)
            predictions[name] = np.asarray(predict_labels(variables, images, model=model))
        return prediction_grid(images, np.stack([p["mask"] for p in pairs]), predictions)


def train_run(config: ml_collections.ConfigDict, workdir: Path, run: Run,
              sources: dict[str, seg_data.SegmentationSource], named_patients: dict[int, list]) -> dict | None:
    """Trains (or resumes) one run and tests its best networks; the run's result, or None if it halted early."""
    run_dir = workdir / "runs" / run.name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        logging.info("Reusing the finished run %s", run.name)
        return json.loads(result_path.read_text())
    step_config = method_config(config, run)
    train = sources["train"]
    labeled, unlabeled = labeled_indices(train, run.labeled, named_patients, run.seed)
    method = CrossTeaching(step_config)
    state = method.init(jax.random.PRNGKey(run.seed))
    iterator = two_stream_iterator(
        train, labeled, unlabeled, image_size=step_config.image_size, seed=run.seed,
        labeled_batch_size=step_config.labeled_batch_size, unlabeled_batch_size=step_config.unlabeled_batch_size,
        augment=config.data.augment, shard_index=jax.process_index(), shard_count=jax.process_count(),
        data_config=config.data)
    steps_per_epoch = max(1, len(labeled) // step_config.labeled_batch_size)
    best = BestWeights(run_dir / "best")
    hooks = SegmentationHooks(method, config, sources["val"], best, steps_per_epoch)
    names = method.networks.names
    console = ("loss", *(f"{name}/supervised_loss" for name in names),
               *(("consistency_weight", "pseudo_label_agreement") if step_config.cross_teaching else ()))
    settings = LoopSettings.from_config(
        config, total_steps=config.max_iterations,
        batch_size=step_config.labeled_batch_size + step_config.unlabeled_batch_size,
        finite_metrics=("loss", *(f"{name}/grad_norm" for name in names)), console_metrics=console)
    writer = create_writer(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        writer.write_hparams(flat_hparams(config))
    logging.info("Run %s: %s, %d labelled and %d unlabelled slices, %d iterations.", run.name,
                 " + ".join(method.networks.module(n).__class__.__name__ for n in names), len(labeled),
                 len(unlabeled) if step_config.cross_teaching else 0, config.max_iterations)
    if step_config.cross_teaching:
        warn_if_rampup_unfinished(step_config)
    sharding = parallel.batch_sharding(method.mesh)
    started = time.monotonic()
    state, finished = run_loop(state, iterator, method.train_step, workdir=run_dir, settings=settings, writer=writer,
                               hooks=hooks, to_device=lambda batch: parallel.to_global_batch(batch, sharding))
    if not finished:
        return None
    result = test_run(config, run_dir, run, method, state, sources["test"], best)
    result.update(labeled_slices=int(len(labeled)), train_seconds=time.monotonic() - started)
    result_path.write_text(json.dumps(result, indent=2))
    writer.flush()
    return result


def warn_if_rampup_unfinished(config: CrossTeachingConfig) -> None:
    """Warns when the pseudo-label weight would end below half its full value (a run much shorter than the ramp-up).

    SSL4MIS ramps over consistency_rampup x rampup_every = 30,000 iterations; a shorter run with those settings
    barely teaches across networks, so it says how to scale the ramp-up.
    """
    final = float(consistency_weight(config.max_iterations, config.consistency, config.consistency_rampup,
                                     config.rampup_every))
    if final < 0.5 * config.consistency:
        scaled = max(1, round(config.max_iterations / config.consistency_rampup))
        logging.warning("The pseudo-label weight reaches only %.2g of %g by iteration %d (the ramp-up spans %d "
                        "iterations); set --config.rampup_every=%d to scale it to this run.", final,
                        config.consistency, config.max_iterations,
                        int(config.consistency_rampup * config.rampup_every), scaled)


def test_run(config: ml_collections.ConfigDict, run_dir: Path, run: Run, method: CrossTeaching,
             state: CrossTeachingState, test: seg_data.SegmentationSource, best: BestWeights) -> dict:
    """Each network (best by validation, else final) on the test split: scores, mask PNGs, a saved segmenter."""
    final = method.backbones(state)
    networks = {}
    for name in method.networks.names:
        chosen = best.variables(name) if config.select_best else None
        variables = chosen if chosen is not None else final[name]
        model = method.networks.module(name)
        scores = method_scores(config, model, variables, test)
        if config.save_masks:
            for slice_id, labels in scores.pop("predictions").items():
                write_mask_png(run_dir / "masks" / name / f"{slice_id}.png", labels)
        else:
            scores.pop("predictions")
        info = {"model": getattr(method.config, name), "num_classes": method.config.num_classes,
                "image_size": method.config.image_size, "in_channels": method.config.in_channels,
                "dtype": method.config.dtype, "class_names": list(config.data.class_names), "method": run.method,
                "labeled": run.labeled, "seed": run.seed, "network": name,
                "step": best.scores.get(name, {}).get("step", int(state.step)) if chosen is not None else int(state.step)}
        save_segmenter(run_dir / "models" / name, variables, info)
        networks[name] = {"model": info["model"], "step": info["step"], "summary": scores["summary"],
                          "volumes": {k: {m: v.tolist() for m, v in s.items()} for k, s in scores["volumes"].items()}}
        logging.info("test %s %s: volume Dice %.4f, IoU %.4f, HD95 %.2f", run.name, name,
                     scores["summary"]["volume/dice/mean"], scores["summary"]["volume/iou/mean"],
                     scores["summary"]["volume/hd95/mean"])
    return {"method": run.method, "labeled": run.labeled, "seed": run.seed, "networks": networks}


def method_scores(config: ml_collections.ConfigDict, model: Any, variables: dict,
                  source: seg_data.SegmentationSource) -> dict:
    """Per-volume and per-slice scores of one network, with its predicted label maps."""
    return evaluate_volumes(lambda images: np.asarray(predict_labels(variables, images, model=model)), source,
                            image_size=config.network.image_size, batch_size=config.eval_batch_size,
                            keep_predictions=True)


def result_records(results: Sequence[dict]) -> list[dict]:
    """One flat record per (run, network): method, network, model, labelled setting, seed, test summary."""
    return [{"method": r["method"], "network": name, "model": n["model"], "labeled": r["labeled"], "seed": r["seed"],
             "best_step": n["step"], "train_seconds": r.get("train_seconds"), "test": n["summary"]}
            for r in results for name, n in r["networks"].items()]


TABLE_METRICS = (("volume/dice/mean", "Dice"), ("volume/iou/mean", "IoU"), ("volume/hd95/mean", "HD95"))


def results_table(records: Sequence[dict], class_names: Sequence[str]) -> str:
    """Markdown: per metric, one row per (method, model), one column per labelled setting, mean +- std [95% CI]."""
    settings = list(dict.fromkeys(r["labeled"] for r in records))
    rows = list(dict.fromkeys((r["method"], r["model"]) for r in records))
    lines = ["# Segmentation results", "",
             "Test split, 3D per volume, mean over the foreground classes; mean +- std over seeds, 95% confidence "
             "interval in brackets (Student t; n = seeds)."]
    per_class = [(f"volume/dice/class_{c}", f"Dice {name}") for c, name in enumerate(class_names[1:], start=1)]
    for key, title in (*TABLE_METRICS, *per_class):
        lines += ["", f"## {title}", "", "| method | network | " + " | ".join(settings) + " |",
                  "|---|---|" + "---|" * len(settings)]
        for method, model in rows:
            cells = []
            for setting in settings:
                values = [r["test"][key] for r in records
                          if (r["method"], r["model"], r["labeled"]) == (method, model, setting)]
                cells.append(format_cell(values))
            lines.append(f"| {method} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_cell(values: Sequence[float]) -> str:
    """'mean +- std [low, high] (n)' or '-' for no values."""
    if not values:
        return "-"
    stats = mean_confidence_interval(values)
    if stats["n"] < 2:
        return f"{stats['mean']:.4f} (n=1)"
    return f"{stats['mean']:.4f} +- {stats['std']:.4f} [{stats['low']:.4f}, {stats['high']:.4f}] (n={stats['n']})"


def run_segmentation(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Every planned run, then `results.json` and `results.md`; None when a run halted early (rerun to continue)."""
    workdir = Path(workdir).absolute()
    sources, named_patients = load_sources(config)
    for name, source in sources.items():
        if len(source) == 0:
            raise ValueError(f"The {name} split of {config.data.path} is empty.")
        if config.data.check_pairs:
            source.check()  # a bad mask fails here, in one line naming it, not in a data worker mid-run
    runs = planned_runs(config)
    logging.info("Segmentation: %d runs (%s), %d iterations each.", len(runs),
                 ", ".join(sorted({r.method for r in runs})), config.max_iterations)
    results = []
    for run in runs:
        result = train_run(config, workdir, run, sources, named_patients)
        if result is None:
            logging.info("Run %s halted (halt_after_steps); rerun the same command to continue.", run.name)
            return None
        results.append(result)
    records = result_records(results)
    summary = {"records": records, "class_names": list(config.data.class_names),
               "max_iterations": config.max_iterations, "image_size": config.network.image_size}
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(results_table(records, config.data.class_names))
    logging.info("Wrote %s and results.md", workdir / "results.json")
    return summary
