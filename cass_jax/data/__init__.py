"""Data pipeline on grain: image sources, splits and label fractions, CASS transforms, loaders.

Typical use: `splits = load_splits(config.data)`, then `train_iterator(splits.train_full, ...)` for
pretraining or `train_iterator(splits.train, ...)` / `eval_iterator(splits.test, ...)` downstream.
"""

from cass_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, default_data_config
from cass_jax.data.dicom import DecodeOptions, decode_dicom, decode_options_from_config, is_dicom
from cass_jax.data.loader import ensure_absl_flags_parsed, eval_iterator, steps_per_epoch, train_iterator
from cass_jax.data.sources import (
    DataError,
    FileImageSource,
    ImageSource,
    SyntheticSource,
    TfdsImageSource,
    csv_source,
    folder_sources,
    tfds_sources,
)
from cass_jax.data.splits import DatasetSplits, label_fraction_indices, load_splits
from cass_jax.data.synthetic import SYNTHETIC_CLASS_NAMES, synthetic_phantom
from cass_jax.data.transforms import CassAugment, EvalTransform, decode_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CassAugment",
    "DataError",
    "DatasetSplits",
    "DecodeOptions",
    "EvalTransform",
    "FileImageSource",
    "ImageSource",
    "SYNTHETIC_CLASS_NAMES",
    "SyntheticSource",
    "TfdsImageSource",
    "csv_source",
    "decode_dicom",
    "decode_image",
    "decode_options_from_config",
    "default_data_config",
    "ensure_absl_flags_parsed",
    "eval_iterator",
    "folder_sources",
    "is_dicom",
    "label_fraction_indices",
    "load_splits",
    "steps_per_epoch",
    "synthetic_phantom",
    "tfds_sources",
    "train_iterator",
]
