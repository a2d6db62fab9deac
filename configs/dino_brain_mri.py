"""DINO on the Brain Tumor MRI dataset: main_dino.py's recipe on a ViT-B/16 (the papers' ViT) at 224 px.

python main.py --config=configs/dino_brain_mri.py --workdir=runs/dino_brain_mri
Pretrains (100 epochs, batch 16, as the CASS recipe it is compared with), then probes and fine-tunes the exported
teacher backbone ("vit" in export/arms.json). The ViT starts from the ImageNet weights the CASS config uses
(weights/vit_base_patch16_384.msgpack, position embeddings resampled to 224 px); --config.vit.init=random trains
from scratch, --config.dino.arm=cnn uses the ResNet-50 of config.cnn instead with the ViT's recipe.
Variants: `:resnet50` (the ResNet-50 with the recipe main_dino.py's README gives for it: SGD with momentum 0.9,
lr 0.03, weight decay 1e-4 throughout, global crops at scale 0.14-1 and local ones at 0.05-0.14), `:smoke` (tiny
random arms, 128 px global and 64 px local crops, one short epoch), `:resnet50+smoke` (both).
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
    variants = set(arg.split("+")) if arg else set()
    if "resnet50" in variants:
        c.dino.arm = "cnn"
        c.dino.update(optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                      global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))
    unknown = variants - {"resnet50", "smoke"}
    if unknown:
        raise ValueError(f"Unknown variant {arg!r} of dino_brain_mri; use none, 'resnet50', 'smoke' or "
                         "'resnet50+smoke' (configs/dino_brain_mri.py:resnet50).")
    apply_variant(c, "smoke" if "smoke" in variants else None, "dino_brain_mri")
    c.downstream.arms = (c.dino.arm,)
    return c
