"""CASS, DINO and Barlow Twins against no pretraining on 5,312 real brain MRI (issue 14's study, 2 CPU cores).

python main.py --config=configs/methods_brain_mri_train.py --workdir=W
Pretrains CASS (ResNet-18 + ViT-Tiny together), DINO on each backbone and Barlow Twins on the ResNet-18, all from
random init, then probes (logistic regression) and fine-tunes every exported backbone and the same backbones without
pretraining, at 100% and 10% labels, 3 seeds; W/results.md is the table. The pretrainings take 35 min to 2 h 15 min
each on 2 cores (below), so run one method per invocation when sittings are shorter than the whole study, e.g.
`--config.methods=dino:cnn --config.downstream.evaluate_baseline=False --workdir=W_dino_cnn` (the baseline once:
`--config.downstream.init=arm_init --workdir=W_none`), then `python experiments/merge_results.py W_none W_cass ...
--out OUT` writes one table from all of them.

Data: ../shared/data/brain_mri_train (plain class folders, no test split of its own): a fixed, seeded (split_seed
77), stratified 20% test split and 10% validation split; pretraining sees only the 70% training split.
Choices for the CPU budget (the papers: ResNet-50 + ViT-B/16 from ImageNet, 384 px, 100 epochs):
- 96 px: ViT-Tiny/16 sees 6x6 patches and DINO's 48 px local crops 3x3 (half the global side, as 96 of 224 is in
  main_dino.py); any smaller leaves the ViT too few patches.
- 15 epochs for every method at batch 64 (one protocol: the papers compare at equal epochs), set by the slowest
  run: measured on 2 cores (2026-12-02), CASS 27 images/s (~35 min), DINO ViT-Tiny 12 (~80 min), DINO ResNet-18 7
  (~2 h 15 min), Barlow Twins 14.5 (~65 min), DINO's before its step got ~20% faster (BENCHMARKS.md); warm-ups
  from the official fractions of the run (DINO 10 of 100 epochs -> 2; Barlow Twins 10 of 1000 -> 1).
- Fine-tuning: at most 10 epochs, patience 3 (the papers: 50, patience 5).
- DINO runs main_dino.py's default recipe (AdamW, its ViT one) on both backbones, so its two runs differ only in
  the backbone; the official ResNet-50 recipe is one setting away (configs/dino_brain_mri.py:resnet50 lists it).
Variant `:smoke`: the same pipeline on ../shared/data/brain_mri_small (its own test split), tiny arms and heads,
64 px, one epoch, one seed: checks the whole study end to end in minutes.
"""

from configs.common import base_config, tiny_arms


def get_config(arg: str | None = None):
    c = base_config()
    c.mode = "pipeline"
    c.methods = ("cass", "dino:vit", "dino:cnn", "barlow_twins:cnn")
    c.data.source = "folder"
    c.data.path = "../shared/data/brain_mri_train"
    c.data.split_mode = "stratified"
    c.data.test_fraction = 0.2
    c.data.val_fraction = 0.1
    c.data.image_size = 96
    c.cnn.name, c.cnn.init = "resnet18", "random"
    c.vit.name, c.vit.init = "vit_tiny_patch16_224", "random"
    c.batch_size = 64
    c.num_epochs = 15
    c.checkpoint_every_steps = 200
    c.dino.update(global_crop_size=96, local_crop_size=48, warmup_epochs=2)
    c.barlow_twins.update(crop_size=96, warmup_epochs=1)
    d = c.downstream
    d.init = "cass"
    d.label_fractions = (1.0, 0.1)
    d.seeds = (0, 1, 2)
    d.max_epochs = 10
    d.patience = 3
    d.saliency = ""
    if arg == "smoke":
        tiny_arms(c, image_size=64)
        c.data.path = "../shared/data/brain_mri_small"  # 400 training images: minutes, not hours
        c.batch_size, c.num_epochs = 16, 1
        c.dino.update(local_crop_size=32, local_crops_number=2)
        d.seeds, d.max_epochs = (0,), 1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of methods_brain_mri_train; use none or 'smoke'.")
    return c
