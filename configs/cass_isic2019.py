"""CASS on ISIC 2019 (8 classes, one-hot CSV labels), seeded 80/10/10 split as the official code.

python main.py --config=configs/cass_isic2019.py --workdir=runs/isic2019
Needs data/isic2019/ISIC_2019_Training_GroundTruth.csv and the images in
data/isic2019/ISIC_2019_Training_Input/ (see data/README.md).
"""

from configs.common import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.data.source = "csv"
    c.data.path = "data/isic2019/ISIC_2019_Training_GroundTruth.csv"
    c.data.image_dir = "data/isic2019/ISIC_2019_Training_Input"
    c.data.csv_image_column = "image"
    # UNK has no training examples in ISIC 2019's ground truth, so the task has 8 classes.
    c.data.csv_label_columns = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    c.data.test_fraction = 0.1
    c.data.val_fraction = 0.1
    apply_variant(c, arg, "cass_isic2019")
    return c
