"""Collapse of CASS from random initialisation on real MRI, with and without each opt-in stabiliser.

python experiments/collapse_comparison.py --data ../shared/data/brain_mri_small --epochs 5 --out runs/collapse
Pretrains the two arms once per variant (same data, seed and schedule) and prints a Markdown table of the
collapse indicators at the end of each epoch (read back from each run's TensorBoard events).
"""

import argparse
import sys
from pathlib import Path

import ml_collections
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cass_jax import data as data_lib
from cass_jax.pretrain import pretrain
from configs.common import base_config

VARIANTS = {
    "paper (cosine only)": {},
    "+ Barlow Twins": {"barlow_twins_weight": 0.005},
    "+ VICReg variance/covariance": {"variance_weight": 25.0, "covariance_weight": 1.0},
    "+ DINO-style centring": {"centring_weight": 1.0},
}
INDICATORS = ("loss/cosine", "collapse/cnn_std", "collapse/vit_std", "collapse/cnn_pairwise_cosine",
              "collapse/vit_pairwise_cosine")


def pretrain_config(args: argparse.Namespace, weights: dict) -> ml_collections.ConfigDict:
    """One variant's pretraining: random arms, constant lr, one log line per epoch, stabiliser `weights`."""
    config = base_config()
    config.data.source, config.data.path, config.data.image_size = "folder", args.data, args.image_size
    config.cnn.name, config.cnn.init = args.cnn, "random"
    config.vit.name, config.vit.init = args.vit, "random"
    config.num_epochs, config.optim.schedule = args.epochs, "constant"
    config.optim.cnn_lr = config.optim.vit_lr = args.lr
    config.checkpoint_every_steps = 10**9
    config.log_every_steps = data_lib.steps_per_epoch(
        len(data_lib.load_splits(config.data).train_full), config.batch_size)
    for key, value in weights.items():
        config.loss[key] = value
    return config


def epoch_scalars(logdir: Path) -> dict[str, list[float]]:
    """Scalars logged once per epoch (log_every_steps = steps per epoch), by tag."""
    series: dict[str, list[float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    series.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="class-folder dataset (Training/ and Testing/)")
    parser.add_argument("--out", default="runs/collapse")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cnn", default="resnet18")
    parser.add_argument("--vit", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    rows = []
    for name, weights in VARIANTS.items():
        workdir = Path(args.out) / f"variant{len(rows)}"
        pretrain(pretrain_config(args, weights), workdir)
        series = epoch_scalars(workdir)
        rows.append((name, series))

    print(f"\n{args.cnn} + {args.vit}, {args.image_size} px, batch 16, Adam lr {args.lr} constant, random init; "
          "values at the end of each epoch (means over the epoch's steps)\n")
    print("| variant | epoch | cosine loss | std CNN / ViT | pairwise cosine CNN / ViT |")
    print("|---|---|---|---|---|")
    for name, series in rows:
        print(f"| {name} | 0 (init) | - | {series['collapse/cnn_initial_std'][0]:.5f} / "
              f"{series['collapse/vit_initial_std'][0]:.5f} | - |")
        for epoch in range(len(series["loss/cosine"])):
            v = {tag: series[tag][epoch] for tag in INDICATORS}
            print(f"| {name} | {epoch + 1} | {v['loss/cosine']:.4f} | {v['collapse/cnn_std']:.5f} / "
                  f"{v['collapse/vit_std']:.5f} | {v['collapse/cnn_pairwise_cosine']:.4f} / "
                  f"{v['collapse/vit_pairwise_cosine']:.4f} |")


if __name__ == "__main__":
    main()
