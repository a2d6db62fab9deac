"""Test-session settings: a persistent XLA compilation cache shared by every test and subprocess.

Many tests build the same tiny arms; compiling each step once instead of per test keeps CI short.
"""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Loading PyTorch's triton after TensorFlow (which clu's TensorBoard writer imports) segfaults with these pins
# (tensorflow-cpu 2.21, torch 2.14.1): `import tensorflow; import triton` crashes, the other order works. Tests that
# build torch optimizers load triton through torch._dynamo, so load it first whatever subset of tests runs.
try:
    import triton  # noqa: F401
except ImportError:
    pass
