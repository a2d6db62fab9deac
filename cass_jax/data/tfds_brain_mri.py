"""TFDS builder for the Kaggle Brain Tumor MRI folder layout, so it can be prepared once as array_record.

Prepare: `BrainTumorMri(data_dir=...).download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=<folder with Training/ and Testing/>), file_format="array_record")`, then read it with
data.source="tfds", data.path="brain_tumor_mri". Original JPEG bytes are stored unchanged.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from cass_jax.data.sources import BRAIN_MRI_HINT, DataError, folder_sources

BRAIN_MRI_CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")


class BrainTumorMri(tfds.core.GeneratorBasedBuilder):
    """Brain Tumor MRI Dataset (Kaggle, masoudnickparvar): 4 classes, Training/ and Testing/ folders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = BRAIN_MRI_HINT

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # Files mix grayscale and RGB; readers convert to RGB (cass_jax decodes with PIL).
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=BRAIN_MRI_CLASS_NAMES),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        splits = folder_sources(str(root), BRAIN_MRI_CLASS_NAMES)
        if "test" not in splits:
            raise DataError(f"{root} needs Training/ and Testing/ folders. {BRAIN_MRI_HINT}")
        return {name: self._generate_examples(source) for name, source in splits.items()}

    def _generate_examples(self, source):
        for path, label, example_id in zip((source.paths[r] for r in source.rows), source.labels, source.ids):
            yield example_id, {"image": Path(path).read_bytes(), "label": int(label), "id": example_id}
