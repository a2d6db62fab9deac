"""Masks from a saved segmentation network for new images (a folder, recursively, or a CSV of paths).

python main.py --config=configs/seg_predict.py --config.model=runs/seg_acdc/runs/<run>/models/cnn \
    --config.input=FOLDER_OR_CSV --workdir=runs/seg_predict [--config.overlays=True]
"""

from cass_jax.segmentation.predict import default_segment_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/seg_predict.py has no variant {arg!r}; set options with --config.<key>=...")
    return default_segment_config()
