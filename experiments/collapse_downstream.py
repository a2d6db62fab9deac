"""Does an anti-collapse stabiliser buy anything downstream? CASS from random init on real MRI, per loss variant.

python experiments/collapse_downstream.py --data ../shared/data/brain_mri_small --pretrain-out runs/collapse \
    --out runs/collapse_downstream --ft-epochs 4 --ft-patience 2

For each variant of collapse_comparison.VARIANTS, pretrains the two arms exactly as collapse_comparison does
(skipped when `<pretrain-out>/variant<i>/export/arms.json` exists, so the two scripts share their runs), then:
- linear probe: each arm's pooled backbone features of the pretraining export (weight-averaged when present,
  as finetune's init "cass"), eval mode, no augmentation; standardised with the labelled training images'
  statistics; multinomial logistic regression with C picked on the validation split. (The project's own
  `linear_probe` protocol, Adam on unnormalised features for <= 10 epochs, scored chance on this data for every
  init, so it cannot rank the variants.)
- fine-tuning: cass_jax.finetune.run, mode "finetune", with max_epochs/patience from the command line.
- baselines: the arms at the random weights pretraining starts from (probe with the initial BatchNorm
  statistics and with statistics re-measured on the training images; fine-tuned from the same weights), and
  the same logistic regression on downsampled grayscale pixels.
Every piece is cached under --out (features, one directory per fine-tuning run), so an interrupted run resumes
where it stopped; `--stage` runs one piece. The Markdown tables are printed and written to <out>/report.md.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from collapse_comparison import VARIANTS, pretrain_config

from cass_jax import data as data_lib
from cass_jax import finetune
from cass_jax import metrics as metrics_lib
from cass_jax.models import create_model
from cass_jax.port import load_variables, save_variables
from cass_jax.methods.cass import build_arms, initial_state
from cass_jax.pretrain import measure_batch_stats, pretrain, read_exports

ARMS = ("cnn", "vit")
SPLITS = ("train_full", "val", "test")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
RANDOM_BN = {"random_bn_init": "random init, BN statistics as initialised (mean 0, var 1)",
             "random_bn_recomputed": "random init, BN statistics re-measured on the training images"}


def variant_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Pretraining workdir per variant name, numbered as collapse_comparison numbers them."""
    return {name: Path(args.pretrain_out).absolute() / f"variant{i}" for i, name in enumerate(VARIANTS)}


def stage_pretrain(args: argparse.Namespace) -> None:
    """Pretrains every variant whose export is missing."""
    for name, workdir in variant_dirs(args).items():
        if read_exports(workdir) is not None:
            logging.info("Reusing the pretraining of %r in %s", name, workdir)
            continue
        start = time.perf_counter()
        pretrain(pretrain_config(args, VARIANTS[name]), workdir)
        logging.info("Pretrained %r in %.0f s", name, time.perf_counter() - start)


def random_init_variables(args: argparse.Namespace, splits: data_lib.DatasetSplits) -> dict[str, dict]:
    """The arms at the weights pretraining starts from (seed 0), with the CNN's BatchNorm statistics both as
    initialised and re-measured on the training images (as pretraining does for the averaged weights)."""
    config = pretrain_config(args, {})
    steps = data_lib.steps_per_epoch(len(splits.train_full), config.batch_size)
    arms = build_arms(config, steps, steps)
    state = jax.device_get(initial_state(config, arms))
    recomputed = measure_batch_stats(arms.cnn, config, state.params["cnn"], state.batch_stats["cnn"],
                                  splits.train_full, steps)
    return {
        "random_bn_init": {"cnn": {"params": state.params["cnn"], "batch_stats": state.batch_stats["cnn"]},
                           "vit": {"params": state.params["vit"]}},
        "random_bn_recomputed": {"cnn": {"params": state.params["cnn"], "batch_stats": recomputed},
                                 "vit": {"params": state.params["vit"]}},
    }


def extract_features(model_name: str, variables: dict, splits: data_lib.DatasetSplits,
                     data_config: ml_collections.ConfigDict,
                     image_size: int) -> dict[str, np.ndarray]:
    """Pooled backbone features of every image of each split, eval mode, no augmentation."""
    kwargs = {"img_size": image_size} if model_name.startswith("vit") else {}
    model = create_model(model_name, num_classes=1000, **kwargs)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True)[1])
    out = {}
    for split in SPLITS:
        source = getattr(splits, split)
        features, labels = [], []
        for batch in data_lib.eval_iterator(source, data_config, batch_size=50):
            mask = np.asarray(batch["mask"]).astype(bool)
            features.append(np.asarray(apply(variables, batch["image"]))[mask])
            labels.append(np.asarray(batch["label"])[mask])
        out[f"{split}_x"], out[f"{split}_y"] = np.concatenate(features), np.concatenate(labels)
    return out


def pixel_features(splits: data_lib.DatasetSplits, size: int) -> dict[str, np.ndarray]:
    """Each image resized to size x size (the pipeline's eval resize) as grayscale pixel values in [0, 1]."""
    transform = data_lib.EvalTransform(size)
    out = {}
    for split in SPLITS:
        source = getattr(splits, split)
        records = [transform(source[i]) for i in range(len(source))]
        out[f"{split}_x"] = np.stack([r["image"].mean(axis=-1).reshape(-1) / 255.0 for r in records])
        out[f"{split}_y"] = np.asarray([r["label"] for r in records])
    return out


def cached_features(path: Path, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
    """Features from `path`, computing and saving them first when missing."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **compute())
    with np.load(path) as stored:
        return dict(stored)


def probe_features(args: argparse.Namespace, splits: data_lib.DatasetSplits) -> dict[tuple[str, str], dict]:
    """Features per (init, arm), plus ("pixels", "-"), computed once and cached under <out>/features."""
    data_config = pretrain_config(args, {}).data
    feature_dir = Path(args.out) / "features"
    features = {}
    for name, workdir in variant_dirs(args).items():
        exports = read_exports(workdir)
        if exports is None:
            raise FileNotFoundError(f"No pretraining export in {workdir}; run --stage pretrain first.")
        for arm in ARMS:
            entry = exports[arm]
            path = feature_dir / f"{workdir.name}_{arm}.npz"
            features[name, arm] = cached_features(path, lambda e=entry: extract_features(
                e["name"], load_variables(e.get("swa", e["raw"])), splits, data_config, args.image_size))
    random_paths = {(key, arm): feature_dir / f"{key}_{arm}.npz" for key in RANDOM_BN for arm in ARMS}
    random_variables = (None if all(p.is_file() for p in random_paths.values())
                        else random_init_variables(args, splits))
    for (key, arm), path in random_paths.items():
        name = args.cnn if arm == "cnn" else args.vit
        features[key, arm] = cached_features(path, lambda k=key, a=arm, n=name, v=random_variables: extract_features(
            n, v[k][a], splits, data_config, args.image_size))
    features["pixels", "-"] = cached_features(feature_dir / f"pixels_{args.pixel_size}.npz",
                                              lambda: pixel_features(splits, args.pixel_size))
    return features


def logistic_probe(features: dict, indices: np.ndarray, num_classes: int) -> dict:
    """Standardised multinomial logistic regression on the labelled images; C by validation balanced accuracy
    (ties: lower validation log loss); test balanced accuracy and macro F1."""
    x, y = features["train_full_x"][indices], features["train_full_y"][indices]
    scaler = StandardScaler().fit(x)

    def probabilities(model, split):
        full = np.zeros((len(features[f"{split}_x"]), num_classes))
        full[:, model.classes_] = model.predict_proba(scaler.transform(features[f"{split}_x"]))
        return full

    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x), y)
        val_probs, val_y = probabilities(model, "val"), features["val_y"]
        score = metrics_lib.multiclass_metrics(val_y, val_probs)["balanced_accuracy"]
        log_loss = -np.mean(np.log(np.clip(val_probs[np.arange(len(val_y)), val_y], 1e-12, None)))
        if best is None or (score, -log_loss) > (best[0], -best[1]):
            best = (score, log_loss, c, model)
    test = metrics_lib.multiclass_metrics(features["test_y"], probabilities(best[3], "test"))
    return {"C": best[2], "val_balanced_accuracy": best[0], "test_metrics": test}


def stage_probe(args: argparse.Namespace, splits: data_lib.DatasetSplits) -> None:
    """Linear probes of every init and arm (and raw pixels), every label fraction and seed -> <out>/probe.json."""
    start = time.perf_counter()
    features = probe_features(args, splits)
    feature_seconds = time.perf_counter() - start
    labels = np.asarray(splits.train_full.labels)
    records = []
    for (init, arm), arm_features in features.items():
        for fraction in args.fractions:
            for seed in args.seeds:
                indices = data_lib.label_fraction_indices(labels, fraction, seed, "random")
                result = logistic_probe(arm_features, indices, splits.num_classes)
                records.append({"init": init, "arm": arm, "label_fraction": fraction, "seed": seed,
                                "num_labelled": len(indices), **result})
                logging.info("probe %s %s f=%g s=%d: C=%g test balanced accuracy %.4f", init, arm, fraction, seed,
                             result["C"], result["test_metrics"]["balanced_accuracy"])
    finetune.dump_json(Path(args.out) / "probe.json", {
        "feature_seconds": feature_seconds, "total_seconds": time.perf_counter() - start, "runs": records})


def finetune_config(args: argparse.Namespace, arm: str, init: str, pretrain_workdir: str, fraction: float,
                    seed: int) -> ml_collections.ConfigDict:
    """One fine-tuning run's config: the project's protocol with this script's epochs and patience."""
    config = pretrain_config(args, {})
    config.mode = "finetune"
    d = config.downstream
    d.arm, d.init, d.pretrain_workdir = arm, init, pretrain_workdir
    d.label_fractions, d.seeds = (fraction,), (seed,)
    d.max_epochs, d.patience = args.ft_epochs, args.ft_patience
    return config


def finetune_inits(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """(finetune init string, pretraining workdir) per init label: each variant's export, then random weights."""
    inits = {name: ("cass", str(workdir)) for name, workdir in variant_dirs(args).items()}
    inits["random init"] = ("random-init-files", "")
    return inits


def save_random_init(args: argparse.Namespace, splits: data_lib.DatasetSplits) -> dict[str, str]:
    """The weights pretraining starts from, as files finetune can start from (BN statistics as initialised)."""
    paths = {arm: Path(args.out).absolute() / "random_init" / f"{arm}.msgpack" for arm in ARMS}
    if not all(p.is_file() for p in paths.values()):
        variables = random_init_variables(args, splits)["random_bn_init"]
        for arm in ARMS:
            save_variables(paths[arm], variables[arm])
    return {arm: str(p) for arm, p in paths.items()}


def finetune_dir(args: argparse.Namespace, init_index: int, arm: str, fraction: float, seed: int) -> Path:
    return Path(args.out).absolute() / "finetune" / f"init{init_index}" / f"{arm}_f{fraction:g}_s{seed}"


def stage_finetune(args: argparse.Namespace, splits: data_lib.DatasetSplits) -> None:
    """Fine-tunes each arm (in --ft-arms order) from every init; seeds outermost so a cut-short run stays usable."""
    random_files = save_random_init(args, splits)
    inits = finetune_inits(args)
    for arm in args.ft_arms:
        for seed in args.seeds:
            for index, (label, (init, pretrain_workdir)) in enumerate(inits.items()):
                for fraction in args.fractions:
                    run_dir = finetune_dir(args, index, arm, fraction, seed)
                    if (run_dir / "results.json").is_file():
                        continue
                    init_string = random_files[arm] if init == "random-init-files" else init
                    start = time.perf_counter()
                    finetune.run(finetune_config(args, arm, init_string, pretrain_workdir, fraction, seed), run_dir)
                    logging.info("fine-tuned %s from %r, f=%g s=%d in %.0f s", arm, label, fraction, seed,
                                 time.perf_counter() - start)


def mean_std(values: list[float]) -> str:
    stats = metrics_lib.mean_std(values)
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def table(rows: list[tuple[str, str]], records: list[dict], fractions: list[float]) -> list[str]:
    """Markdown rows (init, arm) x (balanced accuracy, macro F1) at each label fraction, mean ± std over seeds."""
    header = ["init", "arm"] + [f"{metric} {f * 100:g}%" for metric in ("bal. acc.", "macro F1") for f in fractions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for init, arm in rows:
        cells = []
        for metric in ("balanced_accuracy", "macro_f1"):
            for fraction in fractions:
                values = [r["test_metrics"][metric] for r in records
                          if r["init"] == init and r["arm"] == arm and r["label_fraction"] == fraction]
                cells.append(f"{mean_std(values)} (n={len(values)})" if values else "–")
        lines.append(f"| {init} | {arm} | " + " | ".join(cells) + " |")
    return lines


def probe_label(init: str, arm: str) -> str:
    """Table label of a probe's init; the ViT has no BatchNorm, so its two random-init rows are one."""
    if init in RANDOM_BN:
        return "random init" if arm == "vit" else RANDOM_BN[init]
    return init


def stage_report(args: argparse.Namespace) -> None:
    """Prints the probe and fine-tuning tables (whatever has finished) and writes <out>/report.md."""
    out = Path(args.out)
    arm_names = {"cnn": args.cnn, "vit": args.vit, "-": f"{args.pixel_size}x{args.pixel_size} gray pixels"}
    lines = []
    probe_path = out / "probe.json"
    if probe_path.is_file():
        probe = json.loads(probe_path.read_text())
        records = [{**r, "init": probe_label(r["init"], r["arm"]), "arm": arm_names[r["arm"]]}
                   for r in probe["runs"] if (r["init"], r["arm"]) != ("random_bn_recomputed", "vit")]
        rows = list(dict.fromkeys((r["init"], r["arm"]) for r in records))
        chosen = sorted({r["C"] for r in probe["runs"]})
        lines += [(f"Linear probe (standardised logistic regression, C from {list(C_GRID)} on val; chosen C values "
                   f"{chosen}); test split, mean ± std over seeds {args.seeds}; {probe['total_seconds']:.0f} s "
                   f"(features {probe['feature_seconds']:.0f} s)"), "", *table(rows, records, args.fractions), ""]
    records, seconds, epochs = [], 0.0, []
    for index, label in enumerate(finetune_inits(args)):
        for arm in ARMS:
            for fraction in args.fractions:
                for seed in args.seeds:
                    path = finetune_dir(args, index, arm, fraction, seed) / "results.json"
                    if path.is_file():
                        run = json.loads(path.read_text())["runs"][0]
                        seconds += run["train_seconds"]
                        epochs.append((run["best_epoch"], run["epochs_run"]))
                        records.append({**run, "init": label, "arm": arm_names[arm]})
    if records:
        rows = list(dict.fromkeys((r["init"], r["arm"]) for r in records))
        best, ran = np.mean([e[0] for e in epochs]), np.mean([e[1] for e in epochs])
        lines += [(f"Fine-tuning (cass_jax.finetune, focal loss, Adam 3e-4 cosine over max_epochs={args.ft_epochs}, "
                   f"patience {args.ft_patience}, augmentation); test split, mean ± std over seeds {args.seeds}; "
                   f"{len(records)} runs, {seconds:.0f} s of training; mean epochs run {ran:.1f}, mean best epoch "
                   f"{best:.1f}"), "", *table(rows, records, args.fractions), ""]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    print(report, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="class-folder dataset (Training/ and Testing/)")
    parser.add_argument("--pretrain-out", default="runs/collapse", help="collapse_comparison.py's --out")
    parser.add_argument("--out", default="runs/collapse_downstream")
    parser.add_argument("--stage", choices=("all", "pretrain", "probe", "finetune", "report"), default="all")
    parser.add_argument("--epochs", type=int, default=5, help="pretraining epochs")
    parser.add_argument("--cnn", default="resnet18")
    parser.add_argument("--vit", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="pretraining learning rate")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pixel-size", type=int, default=32)
    parser.add_argument("--ft-arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--ft-epochs", type=int, default=4)
    parser.add_argument("--ft-patience", type=int, default=2)
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)

    start = time.perf_counter()
    if args.stage in ("all", "pretrain"):
        stage_pretrain(args)
    if args.stage in ("all", "probe", "finetune"):
        splits = data_lib.load_splits(pretrain_config(args, {}).data)
    if args.stage in ("all", "probe"):
        stage_probe(args, splits)
    if args.stage in ("all", "finetune"):
        stage_finetune(args, splits)
    stage_report(args)
    logging.info("Stage %s took %.0f s", args.stage, time.perf_counter() - start)


if __name__ == "__main__":
    main()
