"""CASS on a multi-label CSV task, e.g. the dermatomyositis biopsies (labels b, tfh, tfh217, tfhl, other).

python main.py --config=configs/cass_multilabel.py --config.data.path=PATH/labels.csv --workdir=runs/multilabel
The CSV has an `image` column and one 0/1 column per label (several 1s per row allowed), or one list column
joined by ';' (set --config.data.csv_label_columns=labels).
"""

from configs.common import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.data.source = "csv"
    c.data.path = "data/dermatomyositis/labels.csv"
    c.data.multi_label = True
    c.data.csv_image_column = "image"
    c.data.csv_label_columns = ("b", "tfh", "tfh217", "tfhl", "other")
    apply_variant(c, arg, "cass_multilabel")
    return c
