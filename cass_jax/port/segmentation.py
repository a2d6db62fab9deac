"""Starting segmentation models from ImageNet encoders: a timm ResNet or Swin file fills the encoder, the rest is fresh.

`ResNetUNet` takes a timm/torchvision ResNet (e.g. `resnet34`), `SwinUNet` a timm or Microsoft Swin Transformer
(e.g. `swin_tiny_patch4_window7_224`, or the `.pth` SSL4MIS downloads). The encoder must fit exactly (one ValueError
lists every problem), the classifier head is dropped, and the decoder keeps its fresh initialisation, with one
exception that follows SSL4MIS's `SwinUnet.load_from`: a Swin-UNet whose encoder stages are shallower than the file's
(SSL4MIS: 2-2-2-2 against Swin-T's 2-2-6-2) takes the first blocks of each stage, and by default its decoder blocks
start as copies of the mirrored encoder stage's blocks (encoder stage i -> decoder `layers_up_{n-1-i}`).
SSL4MIS's U-Net (`UNet`) has no pretrained encoder: SSL4MIS trains it from scratch.
"""

import logging
import os

import jax
from flax import linen as nn

from cass_jax.models import ResNetUNet, SwinUNet, UNet, init_variables
from cass_jax.port.convert import detect_state_dict_layout, port_timm_resnet
from cass_jax.port.io import read_checkpoint
from cass_jax.port.merge import merge_variables
from cass_jax.port.swin import is_swin_state_dict, port_timm_swin, stage_depths

logger = logging.getLogger(__name__)

ENCODER_KINDS = {ResNetUNet: "resnet", SwinUNet: "swin"}


def encoder_kind(model: nn.Module) -> str:
    """'resnet' or 'swin': which pretrained encoder `model` takes; ValueError for models without one."""
    for cls, kind in ENCODER_KINDS.items():
        if isinstance(model, cls):
            return kind
    if isinstance(model, UNet):
        raise ValueError("UNet (SSL4MIS's U-Net) has no pretrained encoder: SSL4MIS trains it from scratch; "
                         "initialise it with init_variables instead.")
    raise ValueError(f"{type(model).__name__} is not a segmentation model with a pretrained encoder; "
                     f"use ResNetUNet (unet_resnet34) or SwinUNet (swin_unet_tiny).")


def read_encoder_weights(path: str | os.PathLike) -> tuple[str, dict]:
    """Reads a ResNet or Swin file (.pth/.bin/.safetensors, or a cass_jax .msgpack); returns (kind, variables)."""
    kind, content = read_checkpoint(path)
    if kind == "msgpack":
        params = content.get("params", {})
        if "patch_embed" in params and "layers_0" in params:
            return "swin", content
        if "conv1" in params and "layer1_0" in params:
            return "resnet", content
        raise ValueError(f"{str(path)!r} holds neither ResNet nor Swin variables (top-level params: "
                         f"{sorted(params)[:8]}); port a timm resnet34 or swin_tiny_patch4_window7_224 file.")
    if kind == "state_dict" and is_swin_state_dict(content):
        return "swin", port_timm_swin(content)
    if kind == "state_dict":
        try:
            layout = detect_state_dict_layout(content)
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}") from None
        if layout == "resnet":
            return "resnet", port_timm_resnet(content)
    raise ValueError(f"{str(path)!r} holds ViT weights; segmentation encoders take ResNet (unet_resnet34) or Swin "
                     f"(swin_unet_tiny) weights.")


def keep_first_blocks(variables: dict, depths: tuple[int, ...], source: str) -> dict:
    """Drops Swin blocks beyond each stage's `depths` (SSL4MIS's load_state_dict(strict=False) ignores them)."""
    params = variables["params"]
    file_depths = stage_depths(params)
    if len(file_depths) != len(depths) or any(have < want for have, want in zip(file_depths, depths)):
        return variables  # merge_variables reports the misfit in full
    kept = {name: value for name, value in params.items() if not name.startswith("layers_")}
    for stage, depth in enumerate(depths):
        stage_params = params[f"layers_{stage}"]
        kept[f"layers_{stage}"] = {name: value for name, value in stage_params.items()
                                   if not name.startswith("blocks_") or int(name.split("_")[1]) < depth}
    if tuple(file_depths) != tuple(depths):
        logger.info("%s: Swin stage depths %s -> %s; keeping the first blocks of each stage, as SSL4MIS does.",
                    source, tuple(file_depths), tuple(depths))
    return {**variables, "params": kept}


def mirror_encoder_into_decoder(params: dict, num_stages: int) -> dict:
    """Decoder blocks start as copies of the mirrored encoder blocks (SSL4MIS's SwinUnet.load_from).

    Encoder `layers_{i}/blocks_{j}` -> decoder `layers_up_{num_stages - 1 - i}/blocks_{j}` for every stage but the
    deepest (whose decoder counterpart is a bare patch expanding).
    """
    params = dict(params)
    for stage in range(num_stages - 1):
        target = f"layers_up_{num_stages - 1 - stage}"
        encoder_stage = params["encoder"][f"layers_{stage}"]
        params[target] = {name: encoder_stage.get(name, value) for name, value in params[target].items()}
    return params


def load_pretrained_encoder(path: str | os.PathLike, model: nn.Module, rng: jax.Array, image_size: int | None = None,
                            mirror_into_decoder: bool = True) -> dict:
    """Variables for a ResNetUNet / SwinUNet whose encoder starts from the ImageNet weights in `path`.

    Everything outside the encoder is freshly initialised from `rng` (at `image_size`, by default the Swin-UNet's
    img_size or 64 px), except, for a Swin-UNet with `mirror_into_decoder`, the decoder's Swin blocks (module
    docstring). Raises one ValueError naming the file for a wrong architecture or weights that do not fit.
    """
    wanted = encoder_kind(model)
    source = str(path)
    kind, loaded = read_encoder_weights(path)
    if kind != wanted:
        raise ValueError(f"{source!r} holds {kind} weights but {type(model).__name__}'s encoder is a {wanted}; "
                         f"wrong architecture: pass a {wanted} file.")
    loaded = {**loaded, "params": {name: value for name, value in loaded["params"].items() if name != "head"}}
    if isinstance(model, SwinUNet):
        loaded = keep_first_blocks(loaded, tuple(model.depths), source)
        image_size = image_size or model.img_size
    fresh = init_variables(model, rng, image_size or 64)
    fresh_encoder = {collection: tree["encoder"] for collection, tree in fresh.items() if "encoder" in tree}
    encoder = merge_variables(fresh_encoder, loaded, source)
    variables = {collection: {**tree, "encoder": encoder[collection]} if collection in encoder else dict(tree)
                 for collection, tree in fresh.items()}
    if isinstance(model, SwinUNet) and mirror_into_decoder:
        variables["params"] = mirror_encoder_into_decoder(variables["params"], len(model.depths))
    logger.info("Loaded the %s encoder of %s from %s.", wanted, type(model).__name__, source)
    return variables
