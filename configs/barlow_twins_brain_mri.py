"""Barlow Twins on the Brain Tumor MRI dataset: the skin-cancer study's further pretraining of a ResNet-50.

python main.py --config=configs/barlow_twins_brain_mri.py --workdir=runs/barlow_twins_brain_mri
Starts from ImageNet weights (config.cnn.init, as the CASS config), trains only the new 8192-8192-8192 projector for
one epoch, then the whole network (--config.barlow_twins.further_mode=partial: only the last bottleneck block) with a
one-cycle lr, an L1 penalty on the last projector layer, batch 128, 100 epochs at 224 px; then probes and
fine-tunes the exported encoder ("cnn" in export/arms.json). --config.barlow_twins.protocol=from_scratch gives
main.py's LARS recipe instead (with --config.cnn.init=random for a truly fresh start).
Variants: `:smoke` (tiny random ResNet, 128 px, one projector-only and one further epoch).
"""

from configs.common import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.method = "barlow_twins"
    c.data.source = "folder"
    c.data.path = "data/brain_tumor_mri"
    c.data.image_size = 224
    c.batch_size = 128
    c.barlow_twins.protocol = "further"
    c.barlow_twins.weight_decay = 1.5e-6  # the study's configs (main.py's default is 1e-6)
    apply_variant(c, arg, "barlow_twins_brain_mri")
    if arg == "smoke":
        c.num_epochs = 2  # the projector-only epoch, then one epoch of further pretraining
    c.downstream.arms = (c.barlow_twins.arm,)
    return c
