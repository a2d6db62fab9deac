"""The measuring parts of bench/: per-step page-fault and kernel-time accounting (bench/method_step.py) and the
FLOP count behind the products' rates (bench/profile_step.py). Their numbers go into BENCHMARKS.md."""

import argparse
import mmap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.method_step import timed_steps
from bench.profile_step import hlo_signatures

PAGE = mmap.PAGESIZE


def test_timed_steps_counts_the_pages_a_step_maps_afresh():
    size = 32 * 2**20
    args = argparse.Namespace(warmup=1, iters=3, batch=4)
    calls = []

    def fresh_mapping_step():  # what glibc does for each large XLA:CPU temp buffer: new pages, touched once
        block = mmap.mmap(-1, size)
        pages = np.frombuffer(block, np.uint8)
        pages.fill(1)
        del pages
        block.close()
        calls.append(1)

    fresh = timed_steps(fresh_mapping_step, args)
    reused_block = np.zeros(size, np.uint8)

    def reused_memory_step():
        reused_block.fill(2)

    reused = timed_steps(reused_memory_step, args)
    assert len(calls) == 4 and len(fresh["step_times_s"]) == 3
    assert fresh["median_step_s"] == sorted(fresh["step_times_s"])[1]
    assert fresh["img_per_s"] == pytest.approx(4 / fresh["median_step_s"], rel=1e-2)
    assert fresh["minor_faults_per_step"] >= 0.9 * size / PAGE
    assert reused["minor_faults_per_step"] < 0.02 * size / PAGE  # its warm-up step faulted the buffer in
    assert fresh["sys_s_per_step"] >= 0


def test_hlo_signatures_count_each_products_flops():
    a, b, c = jnp.ones((64, 32)), jnp.ones((16, 32)), jnp.ones((16, 8))
    compiled = jax.jit(lambda a, b, c: jnp.tanh(a @ b.T) @ c).lower(a, b, c).compile()
    signatures, flops = hlo_signatures(compiled.as_text())
    assert set(flops.values()) == {2 * 64 * 8 * 16, 2 * 64 * 16 * 32}  # the op (a fusion) and the dot inside it
    assert all(name in signatures for name in flops)
    assert sum("tanh" in signature for signature in signatures.values()) >= 1


def test_hlo_signatures_count_batched_products():
    q, k = jnp.ones((2, 3, 5, 4)), jnp.ones((2, 3, 7, 4))
    compiled = jax.jit(lambda q, k: jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", q, k))).lower(q, k).compile()
    _, flops = hlo_signatures(compiled.as_text())
    assert set(flops.values()) == {2 * 2 * 3 * 5 * 7 * 4}


def test_hlo_signatures_count_convolution_flops():
    images, kernel = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 6))

    def convolve(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    compiled = jax.jit(convolve).lower(images, kernel).compile()
    _, flops = hlo_signatures(compiled.as_text())
    assert set(flops.values()) == {2 * (2 * 9 * 9 * 6) * (3 * 3 * 4)}
