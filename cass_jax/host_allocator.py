"""Which malloc serves this process, and a one-line hint when it is glibc's on the CPU backend.

Each XLA:CPU step allocates its temporaries afresh (gigabytes for a DINO step), and glibc maps blocks that large anew
every time, so the kernel faults in and zeroes them again at every step. A caching allocator preloaded before Python
starts (tcmalloc, jemalloc) keeps them: steps 13-23% faster on a 2-core test machine, for more resident memory
(README, "Speed on a CPU"). It cannot be switched from inside a running process, so the run only says so.
"""

from pathlib import Path

CACHING_ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")


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


def allocator_hint(platform: str, maps: str | None = None) -> str | None:
    """A one-line suggestion for CPU runs under glibc's malloc (`maps`: this process's by default); None on
    accelerators, off Linux or when a caching allocator is already loaded."""
    if platform != "cpu":
        return None
    maps = process_maps() if maps is None else maps
    if maps is None or loaded_caching_allocator(maps) is not None:
        return None
    return ("XLA:CPU under glibc's malloc maps and zeroes each step's temporaries afresh; starting with "
            "LD_PRELOAD=<path to libtcmalloc_minimal.so.4> TCMALLOC_RELEASE_RATE=0 made steps 13-23% faster on a "
            "2-core test machine, for more resident memory (README, \"Speed on a CPU\").")
