"""The `config.data` block: every data option an experiment can set, with its default.

Experiment configs start from `default_data_config()` and override what they need.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the default data options (synthetic phantoms, 384 px, ImageNet normalisation)."""
    c = ml_collections.ConfigDict()
    # Where the images come from: "folder" (class folders, optionally under Training/ and Testing/),
    # "csv" (an image column plus label column(s)), "tfds" (a TFDS dataset prepared as array_record)
    # or "synthetic" (procedural MRI-like phantoms; no files needed).
    c.source = "synthetic"
    # Dataset root folder ("folder"), CSV file ("csv") or TFDS name such as "brain_tumor_mri" ("tfds").
    # Ignored for "synthetic".
    c.path = ""
    # Side of the square images fed to the networks (pixels); every image is resized to it.
    c.image_size = 384
    # Per-channel normalisation of [0, 1] pixels. ImageNet statistics by default (as the CASS code);
    # AugReg ViT checkpoints were trained with (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5).
    c.mean = IMAGENET_MEAN
    c.std = IMAGENET_STD
    # Fraction of the training split held out for validation (seeded by split_seed).
    c.val_fraction = 0.1
    # Fraction held out for testing; used only when the dataset has no test split of its own.
    c.test_fraction = 0.1
    # Seed of the train/val/test split (77 as in the CASS code).
    c.split_seed = 77
    # How validation and test are held out of a split that has none: "random" (as the CASS code) or
    # "stratified" (each class contributes its share, so small test sets keep the class proportions).
    c.split_mode = "random"
    # Fraction of training labels kept for supervised training (1.0, 0.1, 0.01 in the paper).
    c.label_fraction = 1.0
    # How the labelled subset is drawn: "random" (as the paper) or "stratified" (every class keeps
    # at least one example, class proportions kept as far as rounding allows).
    c.label_fraction_mode = "random"
    # Seed of the labelled subset; None means split_seed. Downstream runs over several seeds override it
    # (or pass load_splits(cfg, label_fraction_seed=...)).
    c.label_fraction_seed = ml_collections.config_dict.placeholder(int)
    # True for multi-label tasks: labels are float32 multi-hot vectors instead of int class indices.
    c.multi_label = False
    # grain worker processes that decode and augment; 0 runs everything in the calling process.
    c.workers = 0
    # Batches each worker process keeps ready for the trainer.
    c.worker_buffer_size = 2
    # Threads per process (the main one, or each worker) that build batches; PIL releases the GIL.
    c.read_threads = 2
    # Batches those threads build ahead (each is batch x S x S x 3 float32: 28 MiB at 16 x 384 px).
    c.prefetch_batches = 2
    # False: an unreadable or truncated image stops loading with an error naming it.
    # True: such images are dropped when the splits are loaded and their number is logged.
    c.skip_corrupt = False
    # Training augmentation: "cass" (the paper's) or "none" (resize + normalise only).
    c.augment = "cass"
    # Also apply colour jitter before the rotation (the ISIC 2019 notebook); the Brain MRI notebook
    # rotates only.
    c.augment_jitter_with_rotation = False
    # Process images whose three channels are equal (most MRI) as one gray channel: same pixels, ~2x
    # faster. Off only to measure or to rule it out.
    c.gray_fast_path = True
    # Class names in label order. Empty: folder names (sorted), one-hot column names, or the sorted
    # label values. When set, a folder/label not in the list is an error.
    c.class_names = ()
    # CSV: column holding the image file name (relative to image_dir).
    c.csv_image_column = "image"
    # CSV: label columns. Empty: every column except the image column. One column: class names
    # (or, with multi_label, a list joined by csv_label_separator); several columns: 0/1 indicators.
    c.csv_label_columns = ()
    # CSV: separator of a multi-label list column ("b;tfh").
    c.csv_label_separator = ";"
    # CSV: folder the image names are relative to. Empty: the CSV file's folder.
    c.image_dir = ""
    # CSV: extension appended to image names that have none (ISIC 2019 lists "ISIC_0000000").
    c.image_extension = ".jpg"
    # Window of grayscale DICOMs and 16/32-bit or float PNG/TIFF images, as "center,width" in the image's
    # modality values (e.g. "40,400": CT soft tissue in Hounsfield units; "2048,4096": 12-bit data), applied
    # with the DICOM LINEAR window and overriding the file's own. Empty: the DICOM file's VOI LUT or window,
    # else the image's own min..max (16-bit PNG/TIFF: value * 255 / 65535). 8-bit images are never windowed.
    c.window = ""
    # Frame read from multi-frame DICOM files (0-based). None: such files are an error naming them.
    c.dicom_frame = ml_collections.config_dict.placeholder(int)
    # TFDS: directory holding prepared datasets (empty: TFDS's default, ~/tensorflow_datasets).
    c.tfds_data_dir = ""
    # TFDS: feature names of the image and the label.
    c.tfds_image_key = "image"
    c.tfds_label_key = "label"
    # Synthetic phantoms: number of images (split 80/10/10), their side in pixels, and their seed.
    c.synthetic_num_images = 400
    c.synthetic_size = 224
    c.synthetic_seed = 0
    # Synthetic phantoms: lesion contrast and radius, as multiples of the defaults' deliberately faint, small ones
    # (1.0); the demo raises both so that tiny random arms learn the four classes within its few epochs.
    c.synthetic_contrast = 1.0
    c.synthetic_lesion_scale = 1.0
    return c
