"""Compile kernels.cc against the installed oneDNN and jaxlib's FFI headers, once per version, and load it.

The library is built on first use with the system C++ compiler (`CXX`, else g++) into a cache folder
(`CASS_JAX_CACHE`, else ~/.cache/cass_jax) under a name hashed from the source, jaxlib's version and the oneDNN
found, so an upgrade rebuilds and concurrent processes never load a half-written file. oneDNN is looked for in
`CASS_JAX_ONEDNN_ROOT`, else in this Python's prefix, where the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp`
wheels (requirements.txt) put `lib/libdnnl.so` and `include/oneapi/dnnl/dnnl.hpp`. Anything missing makes
`load()` return None with the reason in `unavailable_reason()`; callers then keep XLA's own kernels.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
HANDLERS = {
    "cass_onednn_conv_forward": "CassOnednnConvForward",
    "cass_onednn_conv_input_grad": "CassOnednnConvInputGrad",
    "cass_onednn_conv_kernel_grad": "CassOnednnConvKernelGrad",
    "cass_onednn_matmul": "CassOnednnMatmul",
    "cass_onednn_attention_forward": "CassOnednnAttentionForward",
    "cass_onednn_attention_backward": "CassOnednnAttentionBackward",
}


class OnednnUnavailable(RuntimeError):
    """oneDNN, a compiler or the FFI headers are missing, or the build failed."""


def onednn_root() -> pathlib.Path:
    """The folder holding oneDNN's lib/ and include/."""
    return pathlib.Path(os.environ.get("CASS_JAX_ONEDNN_ROOT", sys.prefix))


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CASS_JAX_CACHE", pathlib.Path.home() / ".cache" / "cass_jax"))


def _library_name(root: pathlib.Path) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(jaxlib.__version__.encode())
    digest.update(str(root.resolve()).encode())
    library = root / "lib" / "libdnnl.so"
    digest.update(str(library.resolve()).encode())
    return f"cass_onednn_{digest.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
    """The compiled library's path, compiling it first if this version is not in the cache."""
    root = onednn_root()
    header = root / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
    if not (root / "lib" / "libdnnl.so").exists() or not header.exists():
        raise OnednnUnavailable(f"no oneDNN under {root} (lib/libdnnl.so and include/oneapi/dnnl/dnnl.hpp): "
                                "pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or set CASS_JAX_ONEDNN_ROOT")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise OnednnUnavailable(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    target = cache_dir() / _library_name(root)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = pathlib.Path(scratch) / target.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{jax.ffi.include_dir()}",
                   f"-I{root / 'include'}", str(SOURCE), f"-L{root / 'lib'}", "-ldnnl",
                   f"-Wl,-rpath,{(root / 'lib').resolve()}", "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OnednnUnavailable(f"compiling {SOURCE} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        library = ctypes.CDLL(str(build()))
    except (OnednnUnavailable, OSError) as error:
        return None, str(error)
    for target, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library, ""


def load() -> ctypes.CDLL | None:
    """The loaded library with its FFI targets registered for the CPU, or None when it cannot be had here."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why `load()` returned None ("" when it did not)."""
    return _load()[1]


def implementations() -> dict[str, str]:
    """Each primitive built so far (a key of its kind and shape) -> the oneDNN implementation that runs it."""
    library = load()
    if library is None:
        return {}
    size = library.CassOnednnImplementations(None, 0)
    text = ctypes.create_string_buffer(size + 1)
    library.CassOnednnImplementations(text, size + 1)
    return dict(line.split("=", 1) for line in text.value.decode().splitlines())
