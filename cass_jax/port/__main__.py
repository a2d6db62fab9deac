"""CLI: port timm/torchvision/big_vision weights to a flax msgpack variables file.

    python -m cass_jax.port --model resnet50 --source PATH|timm --out weights/resnet50.msgpack \
        [--num-classes N] [--img-size S]

`--source timm` lets timm download the pretrained weights (needs internet and `pip install timm`).
"""

import argparse
import logging
import sys
from typing import Sequence

import jax
import numpy as np

from cass_jax.models import create_model, init_variables, is_vit
from cass_jax.port.convert import port_state_dict
from cass_jax.port.io import save_variables
from cass_jax.port.merge import merge_variables
from cass_jax.port.pretrained import check_architecture, read_and_port


def timm_pretrained_variables(name: str) -> tuple[str, dict]:
    """Downloads `name` with timm (pretrained=True) and ports its state_dict: (architecture, variables)."""
    try:
        import timm
    except ImportError:
        raise RuntimeError("--source timm needs timm and torch: `pip install timm torch`.") from None
    try:
        torch_model = timm.create_model(name, pretrained=True)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise RuntimeError(
            f"timm could not fetch pretrained {name!r} ({type(error).__name__}: {first_line}); without internet, "
            f"download the weights elsewhere and pass the file with --source PATH."
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
