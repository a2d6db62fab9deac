"""Reading checkpoint files (.msgpack, .pth/.bin, .safetensors, .npz) into plain numpy dicts.

Every failure names the file and says what to do, because users hand us files from many sources.
"""

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

MSGPACK_SUFFIXES = (".msgpack",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
NPZ_SUFFIXES = (".npz",)
# Training checkpoints often wrap the weights one level down under one of these keys.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "params")


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file {str(path)!r} does not exist; check the path (or port weights first with "
            f"`python -m cass_jax.port --model NAME --source PATH --out {path}`)."
        )
    return path


def save_variables(path: str | os.PathLike, variables: dict) -> None:
    """Writes a variables dict ({"params": ..., "batch_stats": ...}) as flax msgpack, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, dict(variables)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def load_variables(path: str | os.PathLike) -> dict:
    """Reads a flax msgpack variables file written by save_variables (or the port CLI)."""
    path = _require_file(path)
    try:
        variables = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types on corrupt input
        raise ValueError(
            f"Could not read {str(path)!r} as a flax msgpack variables file ({type(error).__name__}: {error}); "
            f"the file is truncated or not written by cass_jax.port. Re-create it with `python -m cass_jax.port`."
        ) from None
    if not isinstance(variables, dict) or "params" not in variables:
        keys = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise ValueError(
            f"{str(path)!r} is msgpack but not a variables dict with a 'params' key (found {keys}); "
            f"write it with cass_jax.port.save_variables."
        )
    return variables


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; bf16/fp16 have no exact numpy twin, so go through fp32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, np.ndarray]:
    while isinstance(state, dict) and len(state) >= 1 and not any(hasattr(v, "shape") for v in state.values()):
        wrapped = [key for key in WRAPPER_KEYS if isinstance(state.get(key), dict)]
        if not wrapped:
            raise ValueError(
                f"{str(path)!r} holds a dict without tensors (keys {sorted(state)[:10]}); expected a state_dict, "
                f"possibly under one of {WRAPPER_KEYS}."
            )
        state = state[wrapped[0]]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (found {type(state).__name__}).")
    tensors = {key: _to_numpy(value) for key, value in state.items() if hasattr(value, "shape")}
    if all(key.startswith("module.") for key in tensors):  # saved from DataParallel / DDP
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a PyTorch .pth/.bin with torch.load(weights_only=True) into {key: numpy array}."""
    path = _require_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {str(path)!r} needs PyTorch: `pip install torch` (or convert the file to .safetensors)."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ValueError(
            f"{str(path)!r} holds Python objects other than tensors{f' ({found.group(1)})' if found else ''}, so it "
            "was not loaded: unpickling them could run code. If you trust the file, convert its weights to "
            "safetensors once: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
            f"'{path.with_suffix('.safetensors')}')\" and use the .safetensors file."
        ) from None
    except Exception as error:
        raise ValueError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({type(error).__name__}: {str(error)[:200]}); "
            f"the file is truncated, corrupt, or not a state_dict. Download or save it again."
        ) from None
    return _unwrap_state_dict(state, path)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a .safetensors file with safetensors' numpy API (no torch needed)."""
    path = _require_file(path)
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise ValueError(
            f"Could not read {str(path)!r} as safetensors ({type(error).__name__}: {str(error)[:200]}); the file is "
            f"truncated or corrupt (bf16 files need conversion to fp32 first). Download or save it again."
        ) from None
    return _unwrap_state_dict(dict(tensors), path)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a big_vision/AugReg .npz into {"a/b/c": array}."""
    path = _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"Could not read {str(path)!r} as .npz ({type(error).__name__}: {str(error)[:200]}); the file is "
            f"truncated or corrupt. Download it again."
        ) from None


def read_checkpoint(path: str | os.PathLike) -> tuple[str, dict]:
    """Reads any supported file by suffix; returns ("msgpack", variables) or ("state_dict"|"npz", flat dict)."""
    suffix = Path(path).suffix.lower()
    if suffix in MSGPACK_SUFFIXES:
        return "msgpack", load_variables(path)
    if suffix in TORCH_SUFFIXES:
        return "state_dict", read_torch_state_dict(path)
    if suffix in SAFETENSORS_SUFFIXES:
        return "state_dict", read_safetensors(path)
    if suffix in NPZ_SUFFIXES:
        return "npz", read_npz(path)
    _require_file(path)
    known = MSGPACK_SUFFIXES + TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + NPZ_SUFFIXES
    raise ValueError(f"Unsupported weights file suffix {suffix!r} for {str(path)!r}; supported: {', '.join(known)}.")
