"""Semi-supervised segmentation of ACDC cardiac MRI: cross teaching (U-Net + Swin-UNet) against supervised baselines.

    python main.py --config=configs/seg_acdc.py --workdir=runs/seg_acdc
    python main.py --config=configs/seg_acdc.py:smoke --workdir=runs/seg_smoke   # minutes on 2 CPU cores
    python main.py --config=configs/seg_acdc.py:cpu --workdir=runs/seg_cpu       # the reduced recipe of RESULTS.md

Defaults are SSL4MIS's `train_cross_teaching_between_cnn_transformer_2D.py` (Luo et al., MIDL 2022): 224 px, 8 + 8
images per batch, SGD 0.01 with poly decay, 30,000 iterations, 7 labelled patients, best weights by validation Dice.
"""

import ml_collections

from cass_jax.segmentation.data import ACDC_CLASS_NAMES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "segmentation"
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict(dict(
        # "acdc": the folder of ../shared/data/acdc (images/, masks/, split.json with SSL4MIS's patient split);
        # "folder": train/val/test folders each with images/ and masks/; "csv": train/val/test CSVs of pairs.
        format="acdc", path="../shared/data/acdc", train="", val="", test="", stem_pattern="",
        num_classes=4, class_names=ACDC_CLASS_NAMES, channels=1,
        augment=True,  # SSL4MIS's RandomGenerator: rot90 + flip, or a rotation in +-20 degrees
        read_threads=2, prefetch_batches=2, workers=0,
        check_pairs=True))  # read every image/mask pair before training (a few seconds for ACDC)
    # Networks: the CNN and the Transformer taught by each other, and the ResNet-34 U-Net of the supervised baseline.
    # *_init: "random", or a timm-ported file (python -m cass_jax.port) for the encoder (SSL4MIS loads ImageNet Swin-T).
    c.network = ml_collections.ConfigDict(dict(
        cnn="unet_ssl4mis", cnn_init="random", transformer="swin_unet_tiny", transformer_init="random",
        resnet_unet="unet_resnet34", resnet_unet_init="random", image_size=224))
    c.optim = ml_collections.ConfigDict(dict(base_lr=0.01, momentum=0.9, weight_decay=1e-4, poly_power=0.9))
    c.max_iterations = 30_000
    c.labeled_batch_size = 8
    c.unlabeled_batch_size = 8
    # Pseudo-label weight: consistency * sigmoid ramp-up over consistency_rampup "epochs" of rampup_every iterations.
    c.consistency = 0.1
    c.consistency_rampup = 200.0
    c.rampup_every = 150
    # Runs: methods x labelled settings x seeds. Settings: "patients:N" (the dataset's named labelled patients,
    # ACDC: 3 or 7) or "fraction:F" (a seeded fraction of the training slices). fully_supervised uses every mask.
    c.methods = ("cross_teaching", "supervised", "fully_supervised", "supervised_resnet_unet")
    c.labeled = ("patients:7",)
    c.seeds = (0, 1, 2)
    # Validation Dice every eval_every_steps picks each network's best weights (select_best), as SSL4MIS.
    c.eval_every_steps = 200
    c.eval_batch_size = 16
    c.select_best = True
    c.picture_images = 4
    c.save_masks = True  # the test split's predicted masks as PNGs under runs/<run>/masks/<network>/
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.halt_after_steps = 0
    if arg == "smoke":
        # Test-sized networks at 64 px, 2 + 2 images, 60 iterations: checks the whole path, learns little.
        c.network.cnn, c.network.transformer, c.network.resnet_unet = (
            "unet_ssl4mis_narrow", "swin_unet_micro", "unet_resnet_tiny")
        c.network.image_size = 64
        c.labeled_batch_size = c.unlabeled_batch_size = 2
        c.max_iterations = 60
        c.consistency_rampup, c.rampup_every = 60.0, 1  # the ramp-up spans the 60 iterations
        c.methods = ("cross_teaching", "supervised")
        c.seeds = (0,)
        c.eval_every_steps = 30
        c.log_every_steps = 10
        c.checkpoint_every_steps = 30
    elif arg == "cpu":
        # The reduced recipe behind RESULTS.md, sized for a 2-core CPU (about 35 min per seed for both methods):
        # 64 px instead of 224, a half-width three-stage Swin-UNet (swin_unet_mini) instead of Swin-T, 2,000
        # iterations instead of 30,000, with the poly decay and the pseudo-label ramp-up scaled to span them
        # (SSL4MIS ramps up over 200 x 150 = 30,000 iterations: unscaled, the weight would stay below 0.002).
        # The U-Net, batch, losses and optimiser are SSL4MIS's.
        c.network.transformer = "swin_unet_mini"
        c.network.image_size = 64
        c.max_iterations = 2000
        c.rampup_every = 10
        c.methods = ("cross_teaching", "supervised")
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of seg_acdc; use none, 'smoke' or 'cpu'.")
    return c
