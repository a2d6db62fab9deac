"""Predictions of saved classifiers for new images (folders, CSV, DICOM), with optional saliency maps.

python main.py --config=configs/predict.py --config.model=runs/demo/models/<name> \
    --config.data.path=FOLDER_OR_CSV --workdir=runs/predict
Several models, comma-separated, are averaged; `--config.split=test` predicts the model's own test split.
"""

from cass_jax.inference import default_predict_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/predict.py has no variant {arg!r}; set options with --config.<key>=...")
    return default_predict_config()
