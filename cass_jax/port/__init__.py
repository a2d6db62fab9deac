"""Weight porting: timm/torchvision/big_vision checkpoints -> cass_jax flax variables, and msgpack I/O."""

from cass_jax.port.convert import (
    detect_state_dict_layout,
    port_big_vision_vit,
    port_state_dict,
    port_timm_resnet,
    port_timm_vit,
    port_torchvision_resnet,
)
from cass_jax.port.io import load_variables, read_checkpoint, save_variables
from cass_jax.port.merge import merge_variables, resample_pos_embed
from cass_jax.port.pretrained import load_pretrained_variables, read_and_port
from cass_jax.port.segmentation import load_pretrained_encoder
from cass_jax.port.swin import port_timm_swin

__all__ = [
    "detect_state_dict_layout", "load_pretrained_encoder", "load_pretrained_variables", "load_variables",
    "merge_variables", "port_big_vision_vit", "port_state_dict", "port_timm_resnet", "port_timm_swin", "port_timm_vit",
    "port_torchvision_resnet", "read_and_port", "read_checkpoint", "resample_pos_embed", "save_variables",
]
