"""timm / Microsoft Swin Transformer state_dicts -> variables for cass_jax.models.swin.SwinTransformer.

timm (>= 0.9) keeps each stage's patch merging at the stage's start (`layers.{i}.downsample`, i >= 1) and the head
at `head.fc`; the original Microsoft checkpoints (the `swin_tiny_patch4_window7_224.pth` SSL4MIS loads) keep it at
the end of the previous stage and the head at `head`. Both are accepted: Microsoft keys are renamed to timm's first,
as timm's own checkpoint filter does. The non-persistent buffers (`relative_position_index`, `attn_mask`) are
recomputed by the model and skipped. Any other unknown key is an error.
"""

import re

import numpy as np

from cass_jax.port.convert import Variables, _conv_kernel, _f32, _linear_kernel, _port_with_rules

SWIN_BUFFERS = r".*(relative_position_index|attn_mask)"


def is_swin_state_dict(state_dict: dict[str, np.ndarray]) -> bool:
    """Whether the keys look like a timm or Microsoft Swin Transformer."""
    return "patch_embed.proj.weight" in state_dict and any(
        key.startswith("layers.0.blocks.0.attn.relative_position_bias_table") for key in state_dict)


def timm_swin_keys(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a Microsoft-layout Swin state_dict to timm's (downsample one stage later, head under head.fc)."""
    if "layers.0.downsample.reduction.weight" not in state_dict:
        return dict(state_dict)
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key)
        renamed[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)] = value
    return renamed


def _swin_rules():
    def leaf(module_path: tuple[str, ...], kind: str, name: str, w: np.ndarray):
        if kind == "conv":
            return [(("params", *module_path, "kernel" if name == "weight" else "bias"),
                     _conv_kernel(w) if name == "weight" else _f32(w))]
        if kind == "linear":
            return [(("params", *module_path, "kernel" if name == "weight" else "bias"),
                     _linear_kernel(w) if name == "weight" else _f32(w))]
        return [(("params", *module_path, "scale" if name == "weight" else "bias"), _f32(w))]

    def block(m, w):
        path = (f"layers_{m[1]}", f"blocks_{m[2]}", *m[3].split("."))
        if m[3] == "attn.relative_position_bias_table":
            return [(("params", *path), _f32(w))]
        return leaf(path, "norm" if m[3] in ("norm1", "norm2") else "linear", m[4], w)

    def downsample(m, w):
        return leaf((f"layers_{m[1]}", "downsample", m[2]), "norm" if m[2] == "norm" else "linear", m[3], w)

    return [
        (r"patch_embed\.proj\.(weight|bias)", lambda m, w: leaf(("patch_embed", "proj"), "conv", m[1], w)),
        (r"patch_embed\.norm\.(weight|bias)", lambda m, w: leaf(("patch_embed", "norm"), "norm", m[1], w)),
        (r"layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", block),
        (r"layers\.(\d+)\.blocks\.(\d+)\.(attn\.relative_position_bias_table)", block),
        (r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", downsample),
        (r"norm\.(weight|bias)", lambda m, w: leaf(("norm",), "norm", m[1], w)),
        (r"head\.fc\.(weight|bias)", lambda m, w: leaf(("head",), "linear", m[1], w)),
    ]


def port_timm_swin(state_dict: dict[str, np.ndarray]) -> Variables:
    """timm or Microsoft Swin Transformer state_dict -> {"params": ...} for models.swin.SwinTransformer.

    The classifier, when present, lands at params/head (the encoder has none; loaders drop it).
    """
    return _port_with_rules(timm_swin_keys(state_dict), _swin_rules(), SWIN_BUFFERS, "timm/Microsoft Swin Transformer")


def stage_depths(params: dict) -> list[int]:
    """Blocks per stage in ported Swin params (layers_{i}/blocks_{j})."""
    depths = []
    while f"layers_{len(depths)}" in params:
        stage = params[f"layers_{len(depths)}"]
        depths.append(sum(1 for name in stage if name.startswith("blocks_")))
    return depths
