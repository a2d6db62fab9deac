"""The allocator hint main.py logs, and the restart under glibc's huge-page tunable."""

import os
import platform
import subprocess
import sys
from pathlib import Path

from cass_jax.host_allocator import (allocator_hint, glibc_version, hugepage_environment, hugepages_on,
                                     loaded_caching_allocator, process_maps, transparent_hugepage_mode)

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
    hint = allocator_hint("cpu", GLIBC_MAPS, {})
    assert hint is not None and "LD_PRELOAD" in hint and "TCMALLOC_RELEASE_RATE=0" in hint
    assert allocator_hint("cpu", TCMALLOC_MAPS) is None
    assert allocator_hint("gpu", GLIBC_MAPS) is None


def test_this_process_matches_its_preload():
    preloaded = any(name in os.environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc"))
    assert (loaded_caching_allocator(process_maps()) is not None) == preloaded


GLIBC_236 = (2, 36)


def test_hugepage_environment_adds_the_tunable_only_where_it_changes_something():
    environment = hugepage_environment({"PATH": "/bin"}, GLIBC_236, "madvise")
    assert environment == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert hugepages_on(environment)
    kept = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC_236, "madvise")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepage_environment(environment, GLIBC_236, "madvise") is None  # already on: no second start
    assert hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC_236, "madvise") is None
    assert hugepage_environment({"CASS_JAX_HUGEPAGES": "0"}, GLIBC_236, "madvise") is None
    assert hugepage_environment({}, (2, 34), "madvise") is None  # no such tunable before 2.35
    assert hugepage_environment({}, None, "madvise") is None  # not glibc
    assert hugepage_environment({}, GLIBC_236, "always") is None
    assert hugepage_environment({}, GLIBC_236, "never") is None
    assert hugepage_environment({}, GLIBC_236, None) is None
    preloaded = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
    assert hugepage_environment(preloaded, GLIBC_236, "madvise") is None


def test_transparent_hugepage_mode_reads_the_bracketed_word(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert transparent_hugepage_mode(mode_file) == "madvise"
    mode_file.write_text("[always] madvise never\n")
    assert transparent_hugepage_mode(mode_file) == "always"
    assert transparent_hugepage_mode(tmp_path / "missing") is None


def test_glibc_version_is_this_interpreters():
    libc, version = platform.libc_ver()
    expected = tuple(int(part) for part in version.split(".")[:2]) if libc == "glibc" else None
    assert glibc_version() == expected


def test_hint_says_when_hugepages_are_on():
    hint = allocator_hint("cpu", GLIBC_MAPS, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert hint is not None and "huge pages" in hint and "CASS_JAX_HUGEPAGES=0" in hint and "LD_PRELOAD" not in hint
    assert "LD_PRELOAD" in allocator_hint("cpu", GLIBC_MAPS, {})


def test_main_starts_itself_once_more_with_hugepages(tmp_path):
    """A program calling rerun_with_hugepages() first runs its body once, under the tunable where the machine allows."""
    program = tmp_path / "program.py"
    program.write_text("import os, sys\nsys.path.insert(0, sys.argv[1])\n"
                       "from cass_jax.host_allocator import rerun_with_hugepages\n"
                       "print('start', flush=True)\nrerun_with_hugepages()\n"
                       "print('body', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[2])\n")
    environment = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    repo = str(Path(__file__).resolve().parents[1])
    lines = subprocess.run([sys.executable, "-u", str(program), repo, "x y"], env=environment, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    expected = hugepage_environment(environment, glibc_version(), transparent_hugepage_mode())
    assert lines[-1] == f"body {expected['GLIBC_TUNABLES'] if expected else ''} x y"
    assert lines.count("start") == (2 if expected else 1)
    opted_out = subprocess.run([sys.executable, str(program), repo, "z"], check=True, capture_output=True, text=True,
                               env={**environment, "CASS_JAX_HUGEPAGES": "0"}).stdout.splitlines()
    assert opted_out == ["start", "body  z"]
