"""DINO on the Brain Tumor MRI dataset: main_dino.py's recipe on a ViT-B/16 (the papers' ViT) at 224 px.

python main.py --config=configs/dino_brain_mri.py --workdir=runs/dino_brain_mri
Pretrains (100 epochs, batch 16, as the CASS recipe it is compared with), then probes and fine-tunes the exported
teacher backbone ("vit" in export/arms.json). The ViT starts from the ImageNet weights the CASS config uses
(weights/vit_base_patch16_384.msgpack, position embeddings resampled to 224 px); --config.vit.init=random trains
from scratch, --config.dino.arm=cnn uses the ResNet-50 of config.cnn instead.
Variants: `:smoke` (tiny random ViT, 128 px global and 64 px local crops, one short epoch).
"""

from configs.common import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.method = "dino"
    c.data.source = "folder"
    c.data.path = "data/brain_tumor_mri"
    c.data.image_size = 224
    c.vit.name = "vit_base_patch16_224"
    apply_variant(c, arg, "dino_brain_mri")
    c.downstream.arms = (c.dino.arm,)
    return c
