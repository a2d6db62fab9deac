"""Defaults shared by every experiment config; each configs/*.py file starts from `base_config()`."""

import ml_collections

from cass_jax.data import default_data_config
from cass_jax.finetune import default_downstream_config
from cass_jax.methods.barlow_twins import default_barlow_twins_config
from cass_jax.methods.dino import default_dino_config
from cass_jax.stabilisers import default_loss_config


def base_config() -> ml_collections.ConfigDict:
    """The papers' pretraining recipe on a ResNet-50 + ViT-B/16 at 384 px, data and downstream blocks included."""
    c = ml_collections.ConfigDict()
    # "pretrain", "finetune", "linear_probe" or "pipeline" (pretrain, then probe and fine-tune both arms).
    c.mode = "pretrain"
    # Self-supervised method: "cass", "dino" or "barlow_twins" (config.dino / config.barlow_twins hold their
    # recipes; both read their backbone from config.cnn or config.vit).
    c.method = "cass"
    # mode=pipeline only: methods to compare ("cass,dino,barlow_twins"), each pretrained in
    # <workdir>/pretrain/<method>/ (a finished export there is reused) and evaluated beside the same arms without
    # self-supervision (config.<arm>.init). Empty: config.method alone, pretrained in the workdir itself.
    c.methods = ()
    c.seed = 0
    # Global batch (all devices, all hosts) and length of pretraining.
    c.batch_size = 16
    c.num_epochs = 100
    # Compute dtype of both arms ("float32" or "bfloat16"); parameters and the loss stay float32.
    c.dtype = "float32"
    c.data = default_data_config()
    c.data.image_size = 384
    # The two arms: timm model names, and "random" or a weights file (ported with `python -m cass_jax.port`).
    # CASS compares the arms' ImageNet-head logits, so both keep num_classes=1000.
    # kernel_grad: which kernels each arm runs: "auto" (on CPU oneDNN's through XLA's FFI where it builds, else
    # matrix-product kernel gradients XLA:CPU runs faster than its own; XLA's on GPU), "onednn", "matmul" or "xla";
    # the same values up to rounding (README, "Speed on a CPU").
    # vit.last_block_class_token_only: the ViT's last block computes only the class token, the only one its
    # logits read (same outputs and gradients, ~6% fewer ViT FLOPs); False keeps every token of that block.
    c.cnn = ml_collections.ConfigDict(dict(
        name="resnet50", init="weights/resnet50.msgpack", num_classes=1000, kernel_grad="auto"))
    c.vit = ml_collections.ConfigDict(dict(
        name="vit_base_patch16_384", init="weights/vit_base_patch16_384.msgpack", num_classes=1000,
        kernel_grad="auto", last_block_class_token_only=True))
    # Adam per arm. schedule: "cosine" (one decay to min_lr over the run, the papers' intent), "reference"
    # (the official code's per-batch CosineAnnealingLR(T_max=reference_t_max): a 32-step cycle) or "constant".
    c.optim = ml_collections.ConfigDict(dict(
        cnn_lr=1e-3, vit_lr=1e-3, schedule="cosine", min_lr=1e-6, warmup_epochs=0.0, reference_t_max=16))
    # Loss: the paper's cosine term, plus opt-in anti-collapse stabilisers (all weights 0 by default).
    c.loss = default_loss_config()
    # Stochastic weight averaging: running mean of each arm's weights, once per epoch, over the last
    # (1 - start_fraction) of the epochs; the averaged CNN gets BatchNorm statistics measured again.
    c.swa = ml_collections.ConfigDict(dict(enabled=True, start_fraction=0.75))
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    # Stop this invocation after this many steps (0: never), checkpointing first; rerun to continue.
    # Useful under job time limits.
    c.halt_after_steps = 0
    # Warn when an arm's output spread (collapse/*_std) falls below this fraction of its first value.
    c.collapse_warning_fraction = 0.1
    # Stop the run (after its last checkpoint) instead of only warning when collapse is detected.
    c.stop_on_collapse = False
    c.dino = default_dino_config()
    c.barlow_twins = default_barlow_twins_config()
    c.downstream = default_downstream_config()
    return c


def tiny_arms(c: ml_collections.ConfigDict, image_size: int = 128) -> None:
    """Swaps in small randomly initialised arms (a few MB each) for demos, smoke runs and tests on a CPU, with
    heads and crops to match for the other methods (DINO: a 1024-d head, global crops at image_size and four
    local crops at half of it; Barlow Twins: a 512-512-512 projector on image_size views)."""
    c.cnn.name, c.cnn.init = "resnet_tiny", "random"
    c.vit.name, c.vit.init = "vit_micro_patch16", "random"
    c.data.image_size = image_size
    c.dino.update(out_dim=1024, hidden_dim=256, bottleneck_dim=64, global_crop_size=image_size,
                  local_crop_size=max(16, image_size // 32 * 16), local_crops_number=4)
    c.barlow_twins.update(projector=(512, 512, 512), crop_size=image_size)


def apply_variant(c: ml_collections.ConfigDict, arg: str | None, config_name: str) -> None:
    """`:smoke` = tiny random arms at 128 px, one short epoch and one downstream seed: checks a dataset end to end."""
    if arg == "smoke":
        tiny_arms(c, image_size=128)
        c.batch_size = 8
        c.num_epochs = 1
        c.log_every_steps = 5
        c.downstream.label_fractions = (1.0,)
        c.downstream.seeds = (0,)
        c.downstream.max_epochs = 1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of {config_name}; use none or 'smoke' (configs/{config_name}.py:smoke).")
