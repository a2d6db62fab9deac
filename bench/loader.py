"""Training input pipeline throughput: cass_jax (grain) vs an equivalent torchvision DataLoader.

Both read the same JPEG files, apply the CASS training augmentation at --image-size and yield
normalised float32 batches, in one process on one core (grain: no worker processes, one read
thread; torch: num_workers=0, one intra-op thread). Runs alternate and the best of --repeats is
kept for each, so background load affects both alike. Prints images/s and the ratio.

  python bench/loader.py --data ../shared/data/brain_mri_small
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cass_jax.data import default_data_config, folder_sources, train_iterator  # noqa: E402
from cass_jax.data.transforms import CassAugment, decode_image, resize  # noqa: E402


def grain_images_per_second(source, image_size: int, batch_size: int, num_batches: int) -> float:
  config = default_data_config()
  config.image_size, config.read_threads, config.prefetch_batches, config.workers = image_size, 1, 2, 0
  iterator = train_iterator(source, config, batch_size=batch_size, seed=0, augment=True)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def torch_images_per_second(paths, labels, image_size: int, batch_size: int, num_batches: int) -> float:
  import torch
  import torchvision.transforms as T
  from PIL import Image

  torch.set_num_threads(1)
  jitter = T.ColorJitter(0.2, 0.2, 0.2)
  transform = T.Compose(
      [
          T.Resize((image_size, image_size)),
          T.RandomApply([jitter, T.RandomPerspective(0.2)], p=0.3),
          T.RandomApply([T.RandomAffine(10)], p=0.3),
          T.RandomVerticalFlip(0.3),
          T.RandomHorizontalFlip(0.3),
          T.ToTensor(),
          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
      ]
  )

  class Files(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with open(paths[i], "rb") as f:
        image = Image.open(io.BytesIO(f.read())).convert("RGB")
      return transform(image), int(labels[i])

  loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
  done, start = 0, None
  while done < num_batches + 1:
    for _ in loader:
      if start is None:
        start = time.perf_counter()  # the first batch is warm-up, as for grain
      else:
        done += 1
      if done == num_batches + 1 or (start is not None and done == num_batches):
        return num_batches * batch_size / (time.perf_counter() - start)
  raise AssertionError("unreachable")


def stage_costs_ms(source, image_size: int, count: int = 100) -> dict[str, float]:
  """Per-image milliseconds of each CPU stage, to see where the time goes."""
  from PIL import Image

  from cass_jax.data.transforms import normalize_batch

  rows = [int(r) for r in source.rows[:count]]
  encoded = [source.encoded_bytes(r) for r in rows]
  costs = {}
  start = time.perf_counter()
  decoded = [decode_image(data, "") for data in encoded]
  costs["decode"] = (time.perf_counter() - start) / count * 1e3
  start = time.perf_counter()
  resized = [resize(Image.fromarray(x), image_size) for x in decoded]
  costs["resize"] = (time.perf_counter() - start) / count * 1e3
  augment, rng = CassAugment(image_size), np.random.default_rng(0)
  start = time.perf_counter()
  augmented = [augment.augment(Image.fromarray(x), rng) for x in decoded]
  costs["resize+augment"] = (time.perf_counter() - start) / count * 1e3
  start = time.perf_counter()
  normalize_batch(np.stack(augmented), (0.5,) * 3, (0.5,) * 3)
  costs["normalize (naive broadcast)"] = (time.perf_counter() - start) / count * 1e3
  del resized
  return costs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri_small"
  parser.add_argument("--data", default=str(default_data), help="class-folder dataset (Training/<class>/*.jpg)")
  parser.add_argument("--image-size", type=int, default=384)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--batches", type=int, default=25, help="timed batches per run")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  source = folder_sources(args.data)["train"]
  paths = [source.paths[r] for r in source.rows]
  grain_runs, torch_runs = [], []
  for _ in range(args.repeats):
    grain_runs.append(grain_images_per_second(source, args.image_size, args.batch_size, args.batches))
    torch_runs.append(torch_images_per_second(paths, source.labels, args.image_size, args.batch_size, args.batches))
  best_grain, best_torch = max(grain_runs), max(torch_runs)
  print(f"files: {len(source)} JPEGs from {args.data}; {args.image_size} px; batch {args.batch_size}; one core each")
  print(f"cass_jax grain : {best_grain:7.1f} images/s  (runs: {', '.join(f'{r:.0f}' for r in grain_runs)})")
  print(f"torchvision    : {best_torch:7.1f} images/s  (runs: {', '.join(f'{r:.0f}' for r in torch_runs)})")
  print(f"ratio grain/torchvision: {best_grain / best_torch:.2f}x")
  for stage, ms in stage_costs_ms(source, args.image_size).items():
    print(f"  {stage:28s} {ms:6.2f} ms/image")


if __name__ == "__main__":
  main()
