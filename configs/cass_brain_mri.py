"""CASS on the Brain Tumor MRI dataset (4 classes), as in the papers: 384 px, batch 16, 100 epochs.

python main.py --config=configs/cass_brain_mri.py --workdir=runs/brain_mri
Variants: `:smoke` (tiny random arms, 128 px, a few steps; any dataset path via --config.data.path).
Needs data/brain_tumor_mri/{Training,Testing}/<class>/*.jpg (see data/README.md) and, for the default arms,
ImageNet weights ported to weights/ (see the README).
"""

from configs.common import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.data.source = "folder"
    c.data.path = "data/brain_tumor_mri"
    apply_variant(c, arg, "cass_brain_mri")
    return c
