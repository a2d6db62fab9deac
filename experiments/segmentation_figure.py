"""The README's segmentation picture: test slices of a finished run, its reference masks and each network's masks.

python experiments/segmentation_figure.py RUN_DIR OUT.png [--images 4] [--data ../shared/data/acdc]

RUN_DIR is `<workdir>/runs/<run>` of `mode=segmentation`; the masks are the run's own `masks/<network>/*.png`.
Slices are the test slices where every structure is present, spread evenly over the split.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cass_jax.segmentation.augment import zoom_to  # noqa: E402
from cass_jax.segmentation.data import acdc_splits  # noqa: E402
from cass_jax.segmentation.figures import prediction_grid, write_png  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=160, help="side of each tile, pixels")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    args = parser.parse_args()

    test = acdc_splits(args.data)[0]["test"]
    networks = sorted(p.name for p in (args.run_dir / "masks").iterdir())
    complete = [i for i in range(len(test)) if len(np.unique(test[i]["mask"])) == test.num_classes]
    chosen = [complete[int(k)] for k in np.linspace(0, len(complete) - 1, args.images)]
    images, masks, predictions = [], [], {name: [] for name in networks}
    for index in chosen:
        record = test[index]
        images.append(zoom_to(record["image"], args.size, args.size, order=1).astype(np.float32) / 255.0)
        masks.append(zoom_to(record["mask"], args.size, args.size))
        for name in networks:
            predicted = np.asarray(Image.open(args.run_dir / "masks" / name / f"{record['id']}.png"))
            predictions[name].append(zoom_to(predicted, args.size, args.size))
    grid = prediction_grid(np.stack(images), np.stack(masks), {k: np.stack(v) for k, v in predictions.items()})
    write_png(args.out, grid)
    print(f"{args.out}: rows {[test[i]['id'] for i in chosen]}, columns image, reference, {', '.join(networks)}")


if __name__ == "__main__":
    main()
