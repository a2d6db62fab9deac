"""cass-jax: Cross-Architectural Self-Supervision (CASS) for medical images in JAX/Flax.

Submodules: `models` (ResNet/ViT), `port` (timm/torchvision/big_vision weights), `data` (grain pipeline),
`losses`, `metrics`, `pretrain`, `finetune`, `pipeline`.
"""

__version__ = "0.1.0"
