"""oneDNN's convolutions and products (cass_jax/onednn) compute what XLA computes, forward and back, and the models
fall back to XLA's kernels where oneDNN cannot run."""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from cass_jax import onednn
from cass_jax.models import create_model, init_variables
from cass_jax.models import kernel_grad as kernel_grads
from cass_jax.models.conv import NHWC_HWIO
from cass_jax.models.kernel_grad import xla_matmul
from cass_jax.onednn import build


def _onednn_installed() -> bool:
    try:
        importlib.metadata.version("onednn-devel-cpu-gomp")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# Where requirements.txt installed oneDNN, the library must build: a failure here is a failure, not a skip.
pytestmark = pytest.mark.skipif(not _onednn_installed(), reason="oneDNN wheels not installed (requirements.txt)")


def test_the_library_builds_and_loads_where_onednn_is_installed():
    assert onednn.available(), build.unavailable_reason()


def hlo_of(function, *args) -> str:
    return jax.jit(function).lower(*args).as_text()


def conv_loss(conv, strides, padding):
    return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO)))


@pytest.mark.parametrize("batch, size, kernel_size, cin, cout, stride, padding", [
    (3, 12, 3, 8, 16, 1, ((1, 1), (1, 1))),   # an odd batch: uneven chunks over the threads
    (4, 12, 3, 16, 8, 2, ((1, 1), (1, 1))),   # strided
    (2, 12, 3, 8, 8, 2, ((0, 1), (0, 1))),    # asymmetric padding ("SAME" with stride 2)
    (2, 20, 7, 3, 16, 2, ((3, 3), (3, 3))),   # an RGB stem
    (5, 9, 1, 24, 40, 2, "VALID"),            # a strided 1x1 downsample
    (1, 10, 3, 4, 6, 1, "VALID"),             # one example: a single chunk
])
def test_convolution_and_both_gradients_equal_xla(batch, size, kernel_size, cin, cout, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, cin, cout)) * 0.1, jnp.float32)
    strides = (stride, stride)
    reference = conv_loss(lax.conv_general_dilated, strides, padding)
    ours = conv_loss(kernel_grads.onednn_conv, strides, padding)
    assert "cass_onednn_conv_forward" in hlo_of(ours, x, kernel)
    np.testing.assert_allclose(jax.jit(ours)(x, kernel), reference(x, kernel), rtol=1e-5)
    expected = jax.grad(reference, argnums=(0, 1))(x, kernel)
    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel)
    for value, want in zip(got, expected):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_gradients_are_the_same_on_every_run():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 16, 16, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) * 0.1, jnp.float32)
    grad = jax.jit(jax.grad(conv_loss(kernel_grads.onednn_conv, (1, 1), ((1, 1), (1, 1))), argnums=(0, 1)))
    first, second = grad(x, kernel), grad(x + 0.0, kernel + 0.0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_small_maps_and_other_dtypes_keep_the_matrix_product_path():
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    kernel = jnp.ones((3, 3, 4, 4), jnp.float32)
    onto_4x4 = hlo_of(lambda x, k: kernel_grads.onednn_conv(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO),
                      x, kernel)
    in_bfloat16 = hlo_of(lambda x, k: kernel_grads.onednn_conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO),
                         x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert "cass_onednn" not in onto_4x4 and "cass_onednn" not in in_bfloat16


# Threads split a batch of at least two entries, else the rows of c (m >= n) or its columns (m < n), unevenly here.
@pytest.mark.parametrize("batch_shape, m, k, n", [((), 9, 5, 6), ((1,), 9, 5, 6), ((1,), 3, 5, 11), ((2, 3), 9, 5, 6),
                                                  ((7,), 3, 5, 11)])
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_and_its_gradients_equal_xla(batch_shape, m, k, n, transpose_a, transpose_b):
    rng = np.random.default_rng(2)
    a = rng.normal(size=batch_shape + ((k, m) if transpose_a else (m, k)))
    b = rng.normal(size=batch_shape + ((n, k) if transpose_b else (k, n)))
    weights = jnp.asarray(rng.normal(size=batch_shape + (m, n)), jnp.float32)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if not batch_shape:  # oneDNN's product takes batch axes; a plain matrix gets one of size 1
        a, b, weights = a[None], b[None], weights[None]

    def loss(product):
        return lambda a, b: jnp.sum(product(a, b, transpose_a, transpose_b) * weights)

    np.testing.assert_allclose(jax.jit(onednn.matmul, static_argnums=(2, 3))(a, b, transpose_a, transpose_b),
                               xla_matmul(a, b, transpose_a, transpose_b), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(loss(onednn.matmul), argnums=(0, 1)))(a, b)
    expected = jax.grad(loss(xla_matmul), argnums=(0, 1))(a, b)
    for value, want in zip(got, expected):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


def test_matmul_says_what_is_wrong_with_its_operands():
    with pytest.raises(ValueError, match="equal batch axes"):
        onednn.matmul(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5)))
    with pytest.raises(ValueError, match="contracted sizes differ"):
        onednn.matmul(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)))


def test_dense_layer_matches_xla_in_value_and_gradients():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 12)), jnp.float32)
    plain, fast = nn.Dense(10), nn.Dense(10, dot_general=kernel_grads.onednn_dot_general)
    params = plain.init(jax.random.key(0), x)

    def loss(layer):
        return lambda params, x: jnp.sum(jnp.tanh(layer.apply(params, x)))

    assert "cass_onednn_matmul" in hlo_of(loss(fast), params, x)
    got = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1)))(params, x)
    expected = jax.value_and_grad(loss(plain), argnums=(0, 1))(params, x)
    for value, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, size", [("resnet18", 128), ("vit_tiny_patch16_224", 32)])
def test_models_with_onednn_kernels_match_xla(name, size):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, size, size, 3)), jnp.float32)
    results = {}
    for kernels in ("onednn", "xla"):
        model = create_model(name, num_classes=5, img_size=size, kernel_grad=kernels) if name.startswith("vit") \
            else create_model(name, num_classes=5, kernel_grad=kernels)
        variables = init_variables(model, jax.random.key(0), size)

        def loss(params, model=model, variables=variables):
            logits = model.apply({**variables, "params": params}, x, train=False)
            return jnp.sum(jnp.sin(logits))

        results[kernels] = jax.jit(jax.value_and_grad(loss))(variables["params"])
    for value, want in zip(jax.tree.leaves(results["onednn"]), jax.tree.leaves(results["xla"])):
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.abs(want).max())))


def test_missing_onednn_is_reported_with_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("CASS_JAX_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(build.OnednnUnavailable, match=str(tmp_path)):
        build.build()


def test_auto_falls_back_and_an_explicit_request_fails_clearly_without_onednn(monkeypatch):
    monkeypatch.setattr(kernel_grads.onednn, "available", lambda: False)
    assert kernel_grads.resolve_kernel_grad("auto") == "matmul"
    assert kernel_grads.conv_function("auto") is kernel_grads.matmul_grad_conv
    with pytest.raises(ValueError, match="kernel_grad='onednn'"):
        kernel_grads.resolve_kernel_grad("onednn")
    with pytest.raises(ValueError, match="choose one of"):
        kernel_grads.resolve_kernel_grad("mkl")


def test_a_cached_build_is_reused(tmp_path, monkeypatch):
    first = build.build()
    assert first.exists() and build.build() == first
    monkeypatch.setenv("CASS_JAX_CACHE", str(tmp_path))
    assert build.build().parent == tmp_path


def xla_attention(qkv, num_heads, scale, queries):
    """timm's attention from its fused projection, in plain jnp (the published formula)."""
    batch, tokens, width = qkv.shape
    x = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    q, k, v = x[0][:, :, :queries], x[1], x[2]
    weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q * scale, k), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, queries, -1)


@pytest.mark.parametrize("batch, tokens, heads, head_dim, queries", [
    (3, 7, 2, 4, 7),     # every token attends
    (3, 7, 2, 4, 1),     # the class token alone (a last block): the other queries get a zero gradient
    (2, 17, 3, 16, 17),
])
def test_attention_and_its_gradient_equal_the_formula(batch, tokens, heads, head_dim, queries):
    rng = np.random.default_rng(5)
    qkv = jnp.asarray(rng.normal(size=(batch, tokens, 3 * heads * head_dim)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(batch, queries, heads * head_dim)), jnp.float32)
    scale = head_dim**-0.5

    def loss(attention):
        return lambda qkv: jnp.sum(jnp.sin(attention(qkv, heads, scale, queries)) * weights)

    np.testing.assert_allclose(jax.jit(onednn.attention, static_argnums=(1, 2, 3))(qkv, heads, scale, queries),
                               xla_attention(qkv, heads, scale, queries), rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(loss(onednn.attention)))(qkv)
    np.testing.assert_allclose(got, jax.grad(loss(xla_attention))(qkv), rtol=1e-5, atol=1e-6)
    if queries < tokens:
        unused_queries = got.reshape(batch, tokens, 3, -1)[:, queries:, 0]
        np.testing.assert_array_equal(unused_queries, 0.0)
