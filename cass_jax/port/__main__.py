"""CLI: port timm/torchvision/big_vision weights to a flax msgpack variables file.

    python -m cass_jax.port --model resnet50 --source PATH|timm --out weights/resnet50.msgpack \
        [--num-classes N] [--img-size S]

`--source timm` lets timm download the pretrained weights (needs internet and `pip install timm`).
"""

import argparse
import contextlib
import logging
import os
import socket
import sys
from typing import Iterator, Sequence
from urllib.parse import urlparse

import jax
import numpy as np

from cass_jax.models import create_model, init_variables, is_vit
from cass_jax.port.convert import port_state_dict
from cass_jax.port.io import save_variables
from cass_jax.port.merge import merge_variables
from cass_jax.port.pretrained import check_architecture, read_and_port


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or HF_ENDPOINT) accepts a TCP connection within `timeout_s`."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_mode() -> Iterator[None]:
    """Makes huggingface_hub use only its local cache, so that an offline machine fails in seconds
    instead of after a minute of retries (the flag is read from the environment at import time)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    previous, hub_constants.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
        del os.environ["HF_HUB_OFFLINE"]


def timm_pretrained_variables(name: str) -> tuple[str, dict]:
    """Downloads `name` with timm (pretrained=True) and ports its state_dict: (architecture, variables).

    Without a connection to the hub, timm may still load the weights from its local cache.
    """
    offline = not hub_reachable() and "HF_HUB_OFFLINE" not in os.environ
    try:
        with hub_offline_mode() if offline else contextlib.nullcontext():
            import timm

            torch_model = timm.create_model(name, pretrained=True)
    except ImportError:
        raise RuntimeError("--source timm needs timm and torch: `pip install timm torch`.") from None
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        where = "no connection to the Hugging Face hub and not in the local cache: " if offline else ""
        raise RuntimeError(
            f"timm could not fetch pretrained {name!r} ({where}{type(error).__name__}: {first_line}); without "
            f"internet, download the weights elsewhere and pass the file with --source PATH."
        ) from None
    state_dict = {key: value.detach().float().numpy() for key, value in torch_model.state_dict().items()}
    return port_state_dict(state_dict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cass_jax.port", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="timm model name, e.g. resnet50, vit_base_patch16_384")
    parser.add_argument("--source", required=True,
                        help="weights file (.pth/.bin/.safetensors/.npz/.msgpack) or 'timm' to download")
    parser.add_argument("--out", required=True, help="output .msgpack path")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="head size (default: the source's; 0 drops the head; other values re-initialise it)")
    parser.add_argument("--img-size", type=int, default=None, help="ViT image size (default: from the name)")
    parser.add_argument("--seed", type=int, default=0, help="seed for any re-initialised head")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        source = "timm:" + args.model if args.source == "timm" else args.source
        if args.source == "timm":
            architecture, loaded = timm_pretrained_variables(args.model)
        else:
            architecture, loaded = read_and_port(args.source)
        num_classes = args.num_classes
        if num_classes is None:
            head = loaded.get("params", {}).get("head")
            num_classes = int(np.shape(head["kernel"])[-1]) if head else 0
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        model = create_model(args.model, num_classes=num_classes, **kwargs)
        if args.img_size and not is_vit(model):
            raise ValueError(f"--img-size applies to ViTs only; {args.model!r} is a ResNet (any size works).")
        check_architecture(architecture, model, source)
        image_size = model.img_size if is_vit(model) else 224
        variables = merge_variables(init_variables(model, jax.random.key(args.seed), image_size), loaded, source)
        save_variables(args.out, variables)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
    print(f"wrote {args.out}: {args.model}, num_classes={num_classes}, {count:,} params, from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
