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
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cass_jax.data import default_data_config, folder_sources, train_iterator  # noqa: E402
from cass_jax.data.transforms import CassAugment, decode_image, resize  # noqa: E402


def grain_images_per_second(
    source, image_size: int, batch_size: int, num_batches: int, workers: int = 0, gray_fast_path: bool = True
) -> tuple[float, float]:
    """(images/s, CPU ms per image) of cass_jax's train_iterator."""
    config = default_data_config()
    config.gray_fast_path = gray_fast_path
    config.image_size, config.read_threads, config.prefetch_batches, config.workers = image_size, 1, 2, workers
    iterator = train_iterator(source, config, batch_size=batch_size, seed=0, augment=True)
    for _ in range(1 + workers):  # warm-up: worker start-up
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    images = num_batches * batch_size
    rate, cpu_ms = images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3
    iterator.close()
    return rate, cpu_ms


def torch_images_per_second(paths, labels, image_size: int, batch_size: int, num_batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the equivalent torchvision Compose + DataLoader."""
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
    batches = iter(loader)
    next(batches)  # warm-up, as for grain
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while done < num_batches:
        try:
            next(batches)
            done += 1
        except StopIteration:
            batches = iter(loader)
    images = num_batches * batch_size
    return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3


def stage_costs_ms(source, image_size: int, count: int = 96) -> dict[str, float]:
    """Per-image milliseconds of each CPU stage of the cass_jax pipeline, to see where the time goes."""
    from PIL import Image

    from cass_jax.data.loader import NormalizeBatch

    rows = [int(r) for r in source.rows[:count]]
    encoded = [source.encoded_bytes(r) for r in rows]

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - start) / count * 1e3

    costs = {}
    decoded, costs["decode JPEG -> RGB"] = timed(lambda: [decode_image(data, "") for data in encoded])
    _, costs["resize (RGB, as torchvision)"] = timed(lambda: [resize(Image.fromarray(x), image_size) for x in decoded])
    augment, rng = CassAugment(image_size), np.random.default_rng(0)
    records = [{"image": x, "label": 0, "id": ""} for x in decoded]
    augmented, costs["resize + CASS augment"] = timed(lambda: [augment(r, rng) for r in records])
    normalize = NormalizeBatch((0.5,) * 3, (0.5,) * 3)
    # Each batch is dropped before the next is built, as in training, so its memory gets reused.
    _, costs["normalise + batch"] = timed(
        lambda: [normalize(augmented[i : i + 16])["image"].shape for i in range(0, count, 16)]
    )
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_mri_small"
    parser.add_argument("--data", default=str(default_data), help="class-folder dataset (Training/<class>/*.jpg)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=25, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-gray-fast-path", action="store_true", help="treat gray images as RGB (what colour data would cost)"
    )
    parser.add_argument("--workers", type=int, default=0, help="also time grain with this many worker processes")
    args = parser.parse_args()
    source = folder_sources(args.data)["train"]
    paths = [source.paths[r] for r in source.rows]
    grain_runs, torch_runs = [], []
    for _ in range(args.repeats):
        grain_runs.append(
            grain_images_per_second(
                source, args.image_size, args.batch_size, args.batches, gray_fast_path=not args.no_gray_fast_path
            )
        )
        torch_runs.append(torch_images_per_second(paths, source.labels, args.image_size, args.batch_size, args.batches))
    best_grain, best_torch = max(grain_runs), max(torch_runs)
    cpu_grain, cpu_torch = min(r[1] for r in grain_runs), min(r[1] for r in torch_runs)
    fast = "off" if args.no_gray_fast_path else "on"
    print(f"files: {len(source)} JPEGs from {args.data}; {args.image_size} px; batch {args.batch_size}; one core each")
    print(f"gray fast path: {fast}; best of {args.repeats} alternating runs of {args.batches} batches")
    print(f"cass_jax grain : {best_grain[0]:7.1f} images/s  {cpu_grain:5.2f} CPU ms/image")
    print(f"torchvision    : {best_torch[0]:7.1f} images/s  {cpu_torch:5.2f} CPU ms/image")
    print(
        f"ratio grain/torchvision: {best_grain[0] / best_torch[0]:.2f}x images/s, {cpu_torch / cpu_grain:.2f}x CPU per image"
    )
    if args.workers:
        rate, _ = grain_images_per_second(source, args.image_size, args.batch_size, 4 * args.batches, args.workers)
        print(f"cass_jax grain, {args.workers} worker processes: {rate:7.1f} images/s")
    for stage, ms in stage_costs_ms(source, args.image_size).items():
        print(f"  {stage:28s} {ms:6.2f} ms/image")


if __name__ == "__main__":
    main()
