"""The allocator hint main.py logs: given only for CPU runs under glibc's malloc."""

import os

from cass_jax.host_allocator import allocator_hint, loaded_caching_allocator, process_maps

GLIBC_MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 123 /usr/bin/python3.11
7f1c2e000000-7f1c2e022000 r--p 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2f000000-7f1c2f021000 rw-p 00000000 00:00 0
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0 [stack]
"""
TCMALLOC_MAPS = GLIBC_MAPS + (
    "7f1c30000000-7f1c30040000 r-xp 00000000 fe:01 789 /home/u/tcmalloc/usr/lib/x86_64-linux-gnu/"
    "libtcmalloc_minimal.so.4.5.10\n")


def test_caching_allocator_found_in_the_process_maps():
    assert loaded_caching_allocator(GLIBC_MAPS) is None
    assert loaded_caching_allocator(TCMALLOC_MAPS) == "libtcmalloc_minimal.so.4.5.10"
    assert loaded_caching_allocator(GLIBC_MAPS.replace("libc.so.6", "libjemalloc.so.2")) == "libjemalloc.so.2"


def test_hint_only_for_cpu_runs_under_glibc():
    hint = allocator_hint("cpu", GLIBC_MAPS)
    assert hint is not None and "LD_PRELOAD" in hint and "TCMALLOC_RELEASE_RATE=0" in hint
    assert allocator_hint("cpu", TCMALLOC_MAPS) is None
    assert allocator_hint("gpu", GLIBC_MAPS) is None


def test_this_process_matches_its_preload():
    preloaded = any(name in os.environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc"))
    assert (loaded_caching_allocator(process_maps()) is not None) == preloaded
