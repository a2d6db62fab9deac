"""A trained classifier as a folder on disk, and the in-memory object that maps images to probabilities.

Downstream runs save one folder per kept model; `load_classifier` reads it (or an exported pretraining
arm) back with every setting it needs, so a user never has to repeat the model name or image size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cass_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from cass_jax.data.loader import normalize_images
from cass_jax.data.transforms import EvalTransform
from cass_jax.models import create_model, init_variables
from cass_jax.port import load_variables, merge_variables, read_and_port, save_variables

CLASSIFIER_FILE = "classifier.json"
VARIABLES_FILE = "variables.msgpack"
HEAD_FILE = "head.msgpack"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
# Every model here reads RGB: gray images are repeated into three channels when they are decoded.
INPUT_CHANNELS = 3


@functools.partial(jax.jit, static_argnames=("model", "multi_label"))
def _probabilities(variables: Mapping[str, Any], images: jax.Array, *, model: nn.Module,
                   multi_label: bool) -> jax.Array:
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A model with its variables and everything needed to feed it: classes, image size, normalisation.

    `classifier(images)` maps a batch of images to class probabilities (softmax, or sigmoid per label
    when `multi_label`). Images are either uint8 (B, H, W, 3) of any size, which `preprocess` resizes and
    normalises exactly as evaluation does, or float32 (B, S, S, 3) already normalised.
    """

    model: nn.Module
    variables: Mapping[str, Any]
    model_name: str
    class_names: tuple[str, ...]
    multi_label: bool
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gray_fast_path: bool = True
    threshold: float = 0.5
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def name(self) -> str:
        """A short label for tables and figures: the folder name, else the model name."""
        return Path(self.path).name if self.path else self.model_name

    def resize(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, 3) image -> uint8 (S, S, 3), the evaluation transform of training."""
        check_channels(np.asarray(image), self.path or self.model_name, batched=False)
        return EvalTransform(self.image_size, self.gray_fast_path)({"image": np.asarray(image)})["image"]

    def preprocess(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """uint8 images (a list of any sizes, or a (B, H, W, 3) array) -> normalised float32 (B, S, S, 3)."""
        return normalize_images([self.resize(image) for image in images], self.mean, self.std)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (B, C) of normalised float32 (B, S, S, 3) images."""
        images = np.asarray(images)
        check_channels(images, self.path or self.model_name, batched=True)
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"{self.name} takes {self.image_size}x{self.image_size} images; got "
                             f"{images.shape[1]}x{images.shape[2]}. Pass uint8 images to resize them.")
        return np.asarray(_probabilities(self.variables, jnp.asarray(images, jnp.float32), model=self.model,
                                         multi_label=self.multi_label))

    def __call__(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        is_uint8 = (images.dtype == np.uint8) if isinstance(images, np.ndarray) else True
        return self.probabilities(self.preprocess(images) if is_uint8 else images)

    def predicted_labels(self, probabilities: np.ndarray) -> list[list[str]]:
        """Class names per row: the argmax, or every label at or above `threshold` when multi-label."""
        if self.multi_label:
            return [[self.class_names[i] for i in np.flatnonzero(row >= self.threshold)] for row in probabilities]
        return [[self.class_names[int(i)]] for i in np.argmax(probabilities, axis=1)]


def check_channels(images: np.ndarray, name: str, batched: bool) -> None:
    """Rejects images whose channel count is not the models' three, saying how to fix gray ones."""
    expected_ndim = 4 if batched else 3
    if images.ndim != expected_ndim or images.shape[-1] != INPUT_CHANNELS:
        layout = "(B, H, W, 3)" if batched else "(H, W, 3)"
        raise ValueError(
            f"{name} expects RGB images of shape {layout}; got shape {images.shape}. Gray images: repeat the "
            "channel (np.repeat(image[..., None], 3, axis=-1)); RGBA: drop the alpha channel.")


def _model_kwargs(model_name: str, image_size: int, last_block_class_token_only: bool = True) -> dict[str, Any]:
    if model_name.startswith("vit"):
        return {"img_size": image_size, "last_block_class_token_only": last_block_class_token_only}
    return {}


def _build_model(info: Mapping[str, Any]) -> nn.Module:
    return create_model(info["model_name"], num_classes=int(info["num_classes"]), dtype=jnp.dtype(info["dtype"]),
                        **info.get("model_kwargs", {}))


def save_classifier(directory: str | os.PathLike, *, model_name: str, variables: Mapping[str, Any],
                    class_names: Sequence[str], multi_label: bool, data_config: Any, dtype: str = "float32",
                    backbone_path: str | None = None, info: Mapping[str, Any] | None = None,
                    config: Any = None) -> Path:
    """Writes a classifier folder: classifier.json, the variables, and the config it came from.

    With `backbone_path` (a linear probe on a weights file), only the head is stored, as head.msgpack,
    and loading reads the backbone from that file again. Files are written atomically.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "num_classes": len(class_names),
        "model_kwargs": _model_kwargs(model_name, int(data_config.image_size)),
        "dtype": str(dtype),
        "class_names": list(class_names),
        "multi_label": bool(multi_label),
        "image_size": int(data_config.image_size),
        "mean": [float(m) for m in data_config.mean],
        "std": [float(s) for s in data_config.std],
        "gray_fast_path": bool(data_config.get("gray_fast_path", True)),
        "input_channels": INPUT_CHANNELS,
        "backbone": str(Path(backbone_path).absolute()) if backbone_path else None,
        **(dict(info) if info else {}),
    }
    variables = jax.device_get(dict(variables))
    if backbone_path:
        save_variables(directory / HEAD_FILE, {"params": {"head": variables["params"]["head"]}})
    else:
        save_variables(directory / VARIABLES_FILE, variables)
    if config is not None:
        _write_text(directory / CONFIG_FILE, config.to_json_best_effort(indent=2))
    _write_text(directory / CLASSIFIER_FILE, json.dumps(description, indent=2))
    return directory


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Reads a saved classifier folder (or its classifier.json), or an exported arm (export/*.msgpack).

    Exported pretraining arms keep their 1000-class ImageNet heads; their "classes" are the head's indices.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".msgpack" and (path.parent / "arms.json").is_file():
        return load_exported_arm(path)
    folder = path.parent if path.name == CLASSIFIER_FILE else path
    description_file = folder / CLASSIFIER_FILE
    if not description_file.is_file():
        what = "no such file or folder" if not path.exists() else f"it has no {CLASSIFIER_FILE}"
        raise FileNotFoundError(
            f"Model {str(path)!r} is not a saved classifier ({what}). Give a folder listed in a workdir's "
            "models.json, or an exported arm such as <workdir>/export/cnn_swa.msgpack.")
    try:
        info = json.loads(description_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{description_file} is not valid JSON ({error}); the classifier folder is damaged.") from None
    model = _build_model(info)
    if info.get("backbone"):
        variables = _probe_variables(model, info, folder)
    else:
        variables = load_variables(folder / VARIABLES_FILE)
    return Classifier(
        model=model, variables=variables, model_name=info["model_name"], class_names=tuple(info["class_names"]),
        multi_label=bool(info["multi_label"]), image_size=int(info["image_size"]), mean=tuple(info["mean"]),
        std=tuple(info["std"]), gray_fast_path=bool(info.get("gray_fast_path", True)), info=info, path=str(folder))


def _probe_variables(model: nn.Module, info: Mapping[str, Any], folder: Path) -> dict:
    """A linear probe's variables: its backbone file, ported and merged as in training, plus the saved head."""
    backbone = info["backbone"]
    if not Path(backbone).is_file():
        raise FileNotFoundError(
            f"{folder} is a linear probe whose backbone weights {backbone!r} no longer exist; restore that file "
            "(the pretraining export) to load it.")
    _, content = read_and_port(backbone)
    fresh = init_variables(model, jax.random.PRNGKey(0), int(info["image_size"]))
    merged = merge_variables(fresh, content, source=backbone)
    head = load_variables(folder / HEAD_FILE)["params"]["head"]
    return flax.core.unfreeze({**merged, "params": {**merged["params"], "head": head}})


def load_exported_arm(path: str | os.PathLike) -> Classifier:
    """An arm exported by pretraining (export/cnn.msgpack, cnn_swa.msgpack, vit...), as a Classifier.

    Its settings (model name, image size, normalisation) come from the export's arms.json.
    """
    path = Path(path)
    arms = json.loads((path.parent / "arms.json").read_text())
    for arm, entry in arms.items():
        if path.name in (entry.get("raw"), entry.get("swa")):
            break
    else:
        raise FileNotFoundError(f"{path} is not listed in {path.parent / 'arms.json'}; give one of its files.")
    size = int(entry["image_size"])
    info = {"model_name": entry["name"], "num_classes": int(entry["num_classes"]), "dtype": "float32",
            "model_kwargs": _model_kwargs(entry["name"], size), "arm": arm}
    return Classifier(
        model=_build_model(info), variables=load_variables(path), model_name=entry["name"],
        class_names=tuple(str(i) for i in range(int(entry["num_classes"]))), multi_label=False, image_size=size,
        mean=tuple(entry.get("mean", IMAGENET_MEAN)), std=tuple(entry.get("std", IMAGENET_STD)), info=info,
        path=str(path))
