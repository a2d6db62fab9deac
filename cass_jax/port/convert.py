"""Pure functions: PyTorch/big_vision weight dicts -> cass_jax linen variables ({"params", "batch_stats"}).

Conventions: torch conv weights (O, I, kh, kw) -> flax kernels (kh, kw, I, O); torch Linear (O, I) -> (I, O);
BatchNorm weight/bias/running_mean/running_var -> params scale/bias and batch_stats mean/var.
Any key the port does not understand is an error (listed in full), so unsupported variants fail loudly.
"""

import re
from typing import Callable

import numpy as np

Variables = dict


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)), dtype=np.float32)


def _linear_kernel(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.T, dtype=np.float32)


def _f32(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _port_with_rules(
    state_dict: dict[str, np.ndarray],
    rules: list[tuple[str, Callable[[re.Match, np.ndarray], list[tuple[tuple[str, ...], np.ndarray]]]]],
    ignored: str,
    what: str,
) -> Variables:
    variables: Variables = {}
    unknown = []
    for key, value in state_dict.items():
        if re.fullmatch(ignored, key):
            continue
        for pattern, convert in rules:
            match = re.fullmatch(pattern, key)
            if match:
                for path, array in convert(match, np.asarray(value)):
                    _set(variables, path, array)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} state_dict key(s) not part of a {what}: {', '.join(sorted(unknown)[:20])}"
            f"{' ...' if len(unknown) > 20 else ''}. This is another architecture or an unsupported variant "
            f"(e.g. a ResNet-D deep stem or a ViT with register tokens / layer scale)."
        )
    if not variables:
        raise ValueError(f"No {what} weights found in the state_dict (keys: {sorted(state_dict)[:10]}).")
    return variables


def _resnet_module_path(name: str) -> tuple[str, ...]:
    """'layer1.0.downsample.1' -> ('layer1_0', 'downsample_bn'); 'bn1' -> ('bn1',)."""
    match = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", name)
    if not match:
        return (name,)
    inner = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(match[3], match[3])
    return (f"layer{match[1]}_{match[2]}", inner)


BN_LEAVES = {
    "weight": ("params", "scale"), "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
}


def _resnet_rules():
    module = r"((?:layer\d+\.\d+\.)?(?:conv\d|bn\d|downsample\.[01]))"

    def conv_or_bn(m, w):
        if w.ndim == 4:
            return [(("params", *_resnet_module_path(m[1]), "kernel"), _conv_kernel(w))]
        return bn(m, w)

    def bn(m, w):
        collection, leaf = BN_LEAVES[m[2]]
        return [((collection, *_resnet_module_path(m[1]), leaf), _f32(w))]

    def fc(m, w):
        if m[1] == "weight":
            return [(("params", "head", "kernel"), _linear_kernel(w))]
        return [(("params", "head", "bias"), _f32(w))]

    return [
        (module + r"\.(weight|bias|running_mean|running_var)", conv_or_bn),
        (r"fc\.(weight|bias)", fc),
    ]


def port_timm_resnet(state_dict: dict[str, np.ndarray]) -> Variables:
    """timm ResNet (resnet18..200) state_dict -> variables for cass_jax.models.ResNet."""
    return _port_with_rules(state_dict, _resnet_rules(), r".*num_batches_tracked", "timm/torchvision ResNet")


def port_torchvision_resnet(state_dict: dict[str, np.ndarray]) -> Variables:
    """torchvision ResNet state_dict -> variables. Its key layout is identical to timm's ResNet."""
    return port_timm_resnet(state_dict)


def _vit_rules():
    def linear(m, w):
        path = ("params", f"blocks_{m[1]}", *m[2].split("."))
        if m[3] == "weight":
            return [((*path, "kernel"), _linear_kernel(w))]
        return [((*path, "bias"), _f32(w))]

    def norm(m, w):
        prefix = ("params", f"blocks_{m[1]}", m[2]) if m[1] is not None else ("params", m[2])
        return [((*prefix, "scale" if m[3] == "weight" else "bias"), _f32(w))]

    def head(m, w):
        return [(("params", "head", "kernel" if m[1] == "weight" else "bias"),
                 _linear_kernel(w) if m[1] == "weight" else _f32(w))]

    def patch(m, w):
        return [(("params", "patch_embed", "kernel" if m[1] == "weight" else "bias"),
                 _conv_kernel(w) if m[1] == "weight" else _f32(w))]

    return [
        (r"cls_token", lambda m, w: [(("params", "cls_token"), _f32(w))]),
        (r"pos_embed", lambda m, w: [(("params", "pos_embed"), _f32(w))]),
        (r"patch_embed\.proj\.(weight|bias)", patch),
        (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", linear),
        (r"(?:blocks\.(\d+)\.)?(norm1|norm2|norm)\.(weight|bias)", norm),
        (r"head\.(weight|bias)", head),
    ]


def port_timm_vit(state_dict: dict[str, np.ndarray]) -> Variables:
    """timm VisionTransformer (class-token pooling, no registers/layer-scale) state_dict -> variables."""
    return _port_with_rules(state_dict, _vit_rules(), r"$^", "timm ViT (class-token pooling)")


def _big_vision_prefix(npz: dict[str, np.ndarray]) -> tuple[str, bool]:
    """Returns (key prefix, is_big_vision_naming). AugReg files use '' or 'opt/target/'; big_vision 'params/'."""
    for prefix, big_vision in (("", False), ("opt/target/", False), ("params/", True), ("params/img/", True)):
        if f"{prefix}embedding/kernel" in npz:
            return prefix, big_vision
    raise ValueError(
        f"Not a big_vision/AugReg ViT .npz: no 'embedding/kernel' key under '', 'opt/target/' or 'params/' "
        f"(keys: {sorted(npz)[:10]})."
    )


def port_big_vision_vit(npz: dict[str, np.ndarray]) -> Variables:
    """big_vision / AugReg ViT .npz (flat "a/b/c" keys) -> variables, following timm's _load_weights.

    Handles per-block ('encoderblock_i') and scanned ('encoderblock' with a leading depth axis) layouts.
    big_vision's own checkpoints add no position embedding to the class token; that becomes a zero row.
    """
    prefix, big_vision = _big_vision_prefix(npz)
    used: set[str] = set()

    def take(key: str, index: int | None = None) -> np.ndarray:
        full = prefix + key
        if full not in npz:
            raise ValueError(f"big_vision ViT .npz lacks key {full!r}; the file is incomplete or another model.")
        used.add(full)
        value = np.asarray(npz[full], dtype=np.float32)
        return value[index] if index is not None else value

    if prefix + "cls" not in npz:
        raise ValueError(
            "big_vision ViT .npz has no 'cls' token: it pools with GAP or MAP, which cass_jax's class-token "
            "ViT cannot reproduce. Use a checkpoint trained with class-token pooling (AugReg / timm)."
        )
    embed_dim = npz[prefix + "cls"].shape[-1]
    params: dict = {
        "patch_embed": {"kernel": take("embedding/kernel"), "bias": take("embedding/bias")},
        "cls_token": take("cls").reshape(1, 1, embed_dim),
        "norm": {"scale": take("Transformer/encoder_norm/scale"), "bias": take("Transformer/encoder_norm/bias")},
    }
    if big_vision:
        posemb = take("pos_embedding").reshape(1, -1, embed_dim)
        params["pos_embed"] = np.concatenate([np.zeros((1, 1, embed_dim), np.float32), posemb], axis=1)
    else:
        params["pos_embed"] = take("Transformer/posembed_input/pos_embedding").reshape(1, -1, embed_dim)
    if prefix + "head/kernel" in npz:
        params["head"] = {"kernel": take("head/kernel"), "bias": take("head/bias")}

    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    scanned = prefix + "Transformer/encoderblock/LayerNorm_0/scale" in npz
    if scanned:
        depth = npz[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len({k for k in npz if re.match(re.escape(prefix) + r"Transformer/encoderblock_\d+/", k)
                     and k.endswith("LayerNorm_0/scale")})
    for i in range(depth):
        block = "Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/"
        idx = i if scanned else None
        attn = f"{block}MultiHeadDotProductAttention_{mha}/"
        qkv_kernel = np.concatenate(
            [take(f"{attn}{n}/kernel", idx).reshape(embed_dim, -1) for n in ("query", "key", "value")], axis=1
        )
        qkv_bias = np.concatenate([take(f"{attn}{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")])
        params[f"blocks_{i}"] = {
            "norm1": {"scale": take(f"{block}LayerNorm_0/scale", idx), "bias": take(f"{block}LayerNorm_0/bias", idx)},
            "attn": {
                "qkv": {"kernel": qkv_kernel, "bias": qkv_bias},
                "proj": {"kernel": take(f"{attn}out/kernel", idx).reshape(-1, embed_dim),
                         "bias": take(f"{attn}out/bias", idx)},
            },
            "norm2": {"scale": take(f"{block}LayerNorm_{ln2}/scale", idx),
                      "bias": take(f"{block}LayerNorm_{ln2}/bias", idx)},
            "mlp": {
                "fc1": {"kernel": take(f"{block}MlpBlock_{mlp}/Dense_0/kernel", idx),
                        "bias": take(f"{block}MlpBlock_{mlp}/Dense_0/bias", idx)},
                "fc2": {"kernel": take(f"{block}MlpBlock_{mlp}/Dense_1/kernel", idx),
                        "bias": take(f"{block}MlpBlock_{mlp}/Dense_1/bias", idx)},
            },
        }
    # Optimizer state and step counters sit beside the weights in AugReg files; weights elsewhere are an error.
    weight_keys = {k for k in npz if k.startswith(prefix) and not k[len(prefix):].startswith(("opt", "step"))}
    leftover = sorted(weight_keys - used)
    if leftover:
        raise ValueError(
            f"big_vision ViT .npz has {len(leftover)} weight(s) cass_jax's ViT has no place for: "
            f"{', '.join(leftover[:20])}{' ...' if len(leftover) > 20 else ''} (e.g. an in21k 'pre_logits' layer "
            f"or another architecture); use a fine-tuned class-token ViT checkpoint."
        )
    return {"params": params}


def detect_state_dict_layout(state_dict: dict[str, np.ndarray]) -> str:
    """'resnet' (timm and torchvision share keys) or 'timm_vit'; ValueError for anything else."""
    if "conv1.weight" in state_dict and any(k.startswith("layer1.0.") for k in state_dict):
        return "resnet"
    if "cls_token" in state_dict and any(k.startswith("blocks.0.attn.qkv.") for k in state_dict):
        return "timm_vit"
    raise ValueError(
        f"Unrecognised state_dict layout (first keys: {sorted(state_dict)[:8]}); expected a timm/torchvision "
        f"ResNet ('conv1.weight', 'layer1.0...') or a timm ViT ('cls_token', 'blocks.0.attn.qkv...')."
    )


def port_state_dict(state_dict: dict[str, np.ndarray]) -> tuple[str, Variables]:
    """Detects the layout and ports; returns (architecture 'resnet'|'vit', variables)."""
    layout = detect_state_dict_layout(state_dict)
    if layout == "resnet":
        return "resnet", port_timm_resnet(state_dict)
    return "vit", port_timm_vit(state_dict)
