"""The one call trainers use to start from pretrained weights: read any supported file, port, merge."""

import logging
import os
from pathlib import Path

import jax
from flax import linen as nn

from cass_jax.models import init_variables, is_vit
from cass_jax.port.convert import port_big_vision_vit, port_state_dict
from cass_jax.port.io import read_checkpoint
from cass_jax.port.merge import merge_variables

logger = logging.getLogger(__name__)


def _architecture_of(variables: dict) -> str:
    return "vit" if "cls_token" in variables.get("params", {}) else "resnet"


def read_and_port(path: str | os.PathLike) -> tuple[str, dict]:
    """Reads .msgpack/.pth/.bin/.safetensors/.npz and returns (architecture 'resnet'|'vit', variables)."""
    kind, content = read_checkpoint(path)
    if kind == "msgpack":
        return _architecture_of(content), content
    if kind == "npz":
        return "vit", port_big_vision_vit(content)
    try:
        return port_state_dict(content)
    except ValueError as error:
        raise ValueError(f"{str(path)!r}: {error}") from None


def check_architecture(architecture: str, model: nn.Module, source: str) -> None:
    """Raises a clear ValueError when ResNet weights meet a ViT model or the other way round."""
    wanted = "vit" if is_vit(model) else "resnet"
    if architecture != wanted:
        raise ValueError(
            f"{source!r} holds {architecture.upper()} weights but the model is a {type(model).__name__}; "
            f"wrong architecture: pass the matching weights file or model name."
        )


def load_pretrained_variables(path: str | os.PathLike, model: nn.Module, image_size: int, rng: jax.Array) -> dict:
    """Variables for `model` at `image_size` initialised from the weights in `path`.

    Accepts flax .msgpack (from cass_jax.port) and, porting on the fly, timm/torchvision .pth/.bin/
    .safetensors and big_vision/AugReg .npz. Position embeddings are resampled to `image_size`, the head
    is re-initialised when num_classes differs (dropped when 0); anything else that does not fit raises
    one ValueError naming the file and listing every problem.
    """
    architecture, loaded = read_and_port(path)
    check_architecture(architecture, model, str(path))
    fresh = init_variables(model, rng, image_size)
    merged = merge_variables(fresh, loaded, source=str(path))
    logger.info("Loaded pretrained weights from %s (%s).", path, Path(path).suffix)
    return merged
