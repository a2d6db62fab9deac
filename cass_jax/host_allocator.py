"""Which malloc serves this process, huge pages for glibc's, and a one-line note on it for CPU runs.

Each XLA:CPU step allocates its temporaries afresh (gigabytes for a DINO step), and glibc maps blocks that large anew
every time, so the kernel faults them in, 4 KiB at a time, and zeroes them again at every step (734k faults and
1.05 s of kernel time per DINO ViT-Tiny step on a 2-core test machine). Where the kernel gives transparent huge pages
only on request (`madvise`, the default of Debian and Ubuntu), glibc >= 2.35 asks for them when started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1: 250x fewer faults per step, a DINO pretraining 11% faster, the same memory.
Tunables are read only when a process starts, so `python main.py` starts itself once more with it
(`rerun_with_hugepages`; CASS_JAX_HUGEPAGES=0 turns that off). Elsewhere, a caching allocator preloaded before Python
starts (tcmalloc, jemalloc) keeps the temporaries instead, for more resident memory (README, "Speed on a CPU").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

CACHING_ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGES_OPT_OUT = "CASS_JAX_HUGEPAGES"  # "0": keep glibc's defaults
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def process_maps() -> str | None:
    """This process's memory map (/proc/self/maps), or None off Linux."""
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return None


def loaded_caching_allocator(maps: str) -> str | None:
    """The caching allocator library mapped into the process whose /proc/PID/maps text `maps` is, else None."""
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[-1]).name.startswith(CACHING_ALLOCATORS):
            return Path(fields[-1]).name
    return None


def glibc_version() -> tuple[int, int] | None:
    """The running C library's glibc version, or None when it is not glibc (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None


def transparent_hugepage_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`: the bracketed word), or None."""
    try:
        words = path.read_text().split()
    except OSError:
        return None
    return next((word.strip("[]") for word in words if word.startswith("[")), None)


def hugepages_on(environ: Mapping[str, str]) -> bool:
    """Whether `environ` already asks glibc's malloc for huge pages."""
    return HUGEPAGE_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def hugepage_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                         thp_mode: str | None) -> dict[str, str] | None:
    """`environ` plus the glibc tunable that makes malloc request transparent huge pages, or None where that would
    change nothing: off glibc or before 2.35 (no such tunable), with the kernel's mode other than `madvise` (`always`
    gives huge pages anyway, `never` none), under a preloaded caching allocator, with the tunable already set or
    CASS_JAX_HUGEPAGES=0."""
    if environ.get(HUGEPAGES_OPT_OUT) == "0" or glibc is None or glibc < (2, 35) or thp_mode != "madvise":
        return None
    if any(name.removeprefix("lib") in environ.get("LD_PRELOAD", "") for name in CACHING_ALLOCATORS):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE}


def rerun_with_hugepages() -> None:
    """Replaces this process by the same command under `hugepage_environment` where that changes something; returns
    otherwise. Call it first thing in a program's entry point: everything before it runs twice."""
    environment = hugepage_environment(os.environ, glibc_version(), transparent_hugepage_mode())
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environment)


def allocator_hint(platform: str, maps: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """One line on how this CPU run allocates its step temporaries (`maps`: this process's, `environ`: its
    environment by default); None on accelerators, off Linux or when a caching allocator is already loaded."""
    if platform != "cpu":
        return None
    maps = process_maps() if maps is None else maps
    if maps is None or loaded_caching_allocator(maps) is not None:
        return None
    if hugepages_on(environ):
        return (f"host memory: glibc's malloc with transparent huge pages ({HUGEPAGE_TUNABLE}; "
                f"{HUGEPAGES_OPT_OUT}=0 turns them off).")
    return ("XLA:CPU under glibc's malloc maps and zeroes each step's temporaries afresh; starting with "
            "LD_PRELOAD=<path to libtcmalloc_minimal.so.4> TCMALLOC_RELEASE_RATE=0 made steps 13-23% faster on a "
            "2-core test machine, for more resident memory (README, \"Speed on a CPU\").")
