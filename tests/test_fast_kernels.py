"""The CPU speed-ups keep the maths: matrix-product conv and Dense kernel gradients, the exact GELU's gradient, q/k/v
splitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from cass_jax.models import create_model, init_variables
from cass_jax.models.conv import NHWC_HWIO, matmul_grad_conv
from cass_jax.models.dense import transposed_grad_dot_general, transposed_lhs_product
from cass_jax.models.kernel_grad import conv_function, dense_function
from cass_jax.models.vit import exact_gelu, split_qkv


def conv_loss(conv, strides, padding):
    # A nonlinear loss so the output gradient differs at every position.
    return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO)))


@pytest.mark.parametrize("size, kernel_size, cin, cout, stride, padding", [
    (20, 1, 24, 40, 1, "VALID"),        # 1x1, wider output: one product
    (20, 1, 40, 24, 2, "VALID"),        # strided 1x1 downsample, narrower output
    (20, 3, 16, 16, 1, ((1, 1), (1, 1))),  # small map: per-tap products
    (20, 3, 16, 32, 2, ((1, 1), (1, 1))),
    (30, 3, 8, 40, 1, ((1, 1), (1, 1))),   # large map (>= 28x28 outputs), wide output: XLA's, chunked over the batch
    (30, 3, 8, 8, 1, ((1, 1), (1, 1))),    # large map, narrow output: XLA's over the whole batch
    (20, 7, 3, 16, 2, ((3, 3), (3, 3))),   # RGB stem: chunked
    (4, 3, 16, 24, 1, ((1, 1), (1, 1))),   # 4x4 output map: forward and input gradient as one im2col product
    (4, 3, 16, 8, 2, ((1, 1), (1, 1))),    # strided onto 2x2 (a ResNet's last stage on small images)
    (1, 3, 8, 8, 1, ((1, 1), (1, 1))),     # 1x1 map: only the centre tap sees data
])
def test_matmul_kernel_gradient_equals_xla(size, kernel_size, cin, cout, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, cin, cout)) * 0.1, jnp.float32)
    strides = (stride, stride)
    expected = jax.grad(conv_loss(lax.conv_general_dilated, strides, padding), argnums=(0, 1))(x, kernel)
    value = jax.jit(conv_loss(matmul_grad_conv, strides, padding))(x, kernel)
    got = jax.jit(jax.grad(conv_loss(matmul_grad_conv, strides, padding), argnums=(0, 1)))(x, kernel)
    np.testing.assert_allclose(value, conv_loss(lax.conv_general_dilated, strides, padding)(x, kernel), rtol=1e-5)
    if kernel_size == 1 or size <= 4:  # a matrix product, forward and back: equal up to float rounding
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(expected[0]).max()))
    else:  # the input gradient is XLA's own
        np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-4 * float(jnp.abs(expected[1]).max()))


def test_many_small_maps_take_the_chunked_kernel_gradient_with_the_same_values(monkeypatch):
    """DINO's local crops (many 12x12 maps): past WINDOW_VALUES the tap windows give way to XLA's chunked form."""
    from cass_jax.models import conv
    monkeypatch.setattr(conv, "WINDOW_VALUES", 1000)  # this test's 3 x 12x12 x 16 inputs count as many
    monkeypatch.setattr(conv, "_tap_products", None)  # so the per-tap path would fail if taken
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(3, 12, 12, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.float32)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    expected = jax.grad(conv_loss(lax.conv_general_dilated, strides, padding), argnums=1)(x, kernel)
    got = jax.jit(jax.grad(conv_loss(matmul_grad_conv, strides, padding), argnums=1))(x, kernel)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_kernel_grad_paths_follow_the_measured_shapes():
    """U-Net layers with narrow outputs on large maps keep XLA's kernel gradient; ResNet layers keep theirs."""
    from cass_jax.models.conv import kernel_grad_path
    assert kernel_grad_path((3, 3, 16, 16), (16, 224, 224, 16), (1, 1)) == "xla"   # SSL4MIS U-Net, 224 px
    assert kernel_grad_path((3, 3, 1, 16), (16, 224, 224, 16), (1, 1)) == "xla"    # its 1-channel input conv
    assert kernel_grad_path((3, 3, 16, 4), (16, 224, 224, 4), (1, 1)) == "xla"     # its 4-class output conv
    assert kernel_grad_path((3, 3, 16, 32), (16, 112, 112, 32), (1, 1)) == "chunked"
    assert kernel_grad_path((7, 7, 3, 64), (16, 112, 112, 64), (2, 2)) == "chunked"  # RGB stem
    assert kernel_grad_path((3, 3, 64, 64), (16, 56, 56, 64), (1, 1)) == "chunked"
    assert kernel_grad_path((3, 3, 256, 256), (16, 14, 14, 256), (1, 1)) == "taps"
    assert kernel_grad_path((3, 3, 32, 16), (16, 16, 16, 16), (1, 1)) == "taps"    # narrow, but a small map
    assert kernel_grad_path((1, 1, 64, 4), (16, 224, 224, 4), (1, 1)) == "taps"    # 1x1: one product


def test_narrow_output_on_a_large_map_takes_xla_kernel_gradient(monkeypatch):
    """The "xla" path gives XLA's own kernel gradient; chunks and taps are not called."""
    from cass_jax.models import conv
    monkeypatch.setattr(conv, "_chunked_kernel_grad", None)
    monkeypatch.setattr(conv, "_tap_products", None)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(2, 30, 30, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 4)) * 0.1, jnp.float32)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    assert conv.kernel_grad_path(kernel.shape, (2, 30, 30, 4), strides) == "xla"
    expected = jax.grad(conv_loss(lax.conv_general_dilated, strides, padding), argnums=(0, 1))(x, kernel)
    got = jax.grad(conv_loss(matmul_grad_conv, strides, padding), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-5 * float(jnp.abs(expected[1]).max()))
    np.testing.assert_array_equal(got[0], expected[0])


def test_matmul_grad_conv_bfloat16_gradient_keeps_kernel_dtype():
    x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
    kernel = jnp.full((3, 3, 4, 8), 0.1, jnp.bfloat16)
    grad = jax.grad(lambda k: jnp.sum(matmul_grad_conv(x, k, (1, 1), ((1, 1), (1, 1)),
                                                       dimension_numbers=NHWC_HWIO).astype(jnp.float32)))(kernel)
    assert grad.dtype == jnp.bfloat16
    # Interior taps see all 8x8 positions of the 2 images (one per output), border taps 7x8.
    assert float(grad[1, 1, 0, 0]) == 128.0 and float(grad[0, 1, 0, 0]) == 112.0


def test_unsupported_convolutions_fall_back_to_lax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 2, 4)), jnp.float32)
    kwargs = {"rhs_dilation": (2, 2), "dimension_numbers": NHWC_HWIO, "feature_group_count": 2}
    np.testing.assert_array_equal(matmul_grad_conv(x, kernel, (1, 1), "SAME", **kwargs),
                                  lax.conv_general_dilated(x, kernel, (1, 1), "SAME", **kwargs))


def test_kernel_grad_choices():
    assert conv_function("matmul") is matmul_grad_conv
    assert conv_function("xla") is None
    from cass_jax import onednn
    from cass_jax.models.kernel_grad import onednn_conv
    on_cpu = onednn_conv if onednn.available() else matmul_grad_conv
    assert conv_function("auto") is (on_cpu if jax.default_backend() == "cpu" else None)
    assert dense_function("matmul") is transposed_grad_dot_general
    assert dense_function("xla") is None
    with pytest.raises(ValueError, match="kernel_grad='eigen'.*auto"):
        conv_function("eigen")
    with pytest.raises(ValueError, match="kernel_grad='fast'"):
        dense_function("fast")


@pytest.mark.parametrize("k, n", [(6, 24), (24, 6)])  # transposes the input, or the output gradient
def test_transposed_lhs_product(k, n):
    rng = np.random.default_rng(4)
    a, b = (jnp.asarray(rng.normal(size=(50, width)), jnp.float32) for width in (k, n))
    np.testing.assert_allclose(jax.jit(transposed_lhs_product)(a, b), np.asarray(a).T @ np.asarray(b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_kernel_gradient_equals_xla(dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 7, 12)), dtype)
    params = {"w1": jnp.asarray(rng.normal(size=(12, 40)) * 0.3, dtype),   # widening, like fc1
              "w2": jnp.asarray(rng.normal(size=(40, 12)) * 0.3, dtype)}   # narrowing, like fc2

    def loss(dot_general):
        def value(params, x):
            hidden = jnp.tanh(dot_general(x, params["w1"], (((2,), (0,)), ((), ()))))
            out = dot_general(hidden, params["w2"], (((2,), (0,)), ((), ())))
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))
        return value

    expected = jax.grad(loss(lax.dot_general), argnums=(0, 1))(params, x)
    got = jax.jit(jax.grad(loss(transposed_grad_dot_general), argnums=(0, 1)))(params, x)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert have.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(have, np.float32), np.asarray(want, np.float32), rtol=tolerance,
                                   atol=tolerance * float(jnp.abs(want.astype(jnp.float32)).max()))


def test_dense_function_falls_back_for_other_contractions():
    rng = np.random.default_rng(6)
    lhs, rhs = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32), jnp.asarray(rng.normal(size=(3, 5, 2)))
    numbers = (((2,), (1,)), ((0,), (0,)))  # a batched product: not Dense's form
    np.testing.assert_array_equal(transposed_grad_dot_general(lhs, rhs, numbers), lax.dot_general(lhs, rhs, numbers))


def test_vit_gradients_match_between_kernel_grad_choices():
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    grads = {}
    for choice in ("xla", "matmul"):
        model = create_model("vit_micro_patch16", num_classes=10, img_size=32, kernel_grad=choice)
        variables = init_variables(model, jax.random.key(0), 32)
        grads[choice] = jax.jit(jax.grad(
            lambda params, model=model: jnp.sum(jnp.sin(model.apply({"params": params}, images)))))(
            variables["params"])
    for path, expected in jax.tree_util.tree_leaves_with_path(grads["xla"]):
        got = dict(jax.tree_util.tree_leaves_with_path(grads["matmul"]))[path]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()) + 1e-8,
                                   err_msg=jax.tree_util.keystr(path))


def test_resnet_gradients_match_between_kernel_grad_choices():
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 128, 128, 3)), jnp.float32)
    grads = {}
    for choice in ("xla", "matmul"):
        model = create_model("resnet_tiny", num_classes=10, kernel_grad=choice)
        variables = init_variables(model, jax.random.key(0), 128)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits))

        grads[choice] = jax.jit(jax.grad(loss))(variables["params"])
    for path, expected in jax.tree_util.tree_leaves_with_path(grads["xla"]):
        got = dict(jax.tree_util.tree_leaves_with_path(grads["matmul"]))[path]
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * float(jnp.abs(expected).max()) + 1e-8,
                                   err_msg=jax.tree_util.keystr(path))


def test_exact_gelu_values_and_gradient_match_autodiff():
    x = jnp.linspace(-6.0, 6.0, 1001)
    # Same formula as torch.nn.GELU(); jax's erfc form only differs where both are within 1e-6 of 0.
    np.testing.assert_allclose(exact_gelu(x), nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    expected = jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(jax.vmap(jax.grad(exact_gelu))(x), expected, rtol=1e-5, atol=1e-6)


def test_split_qkv_matches_indexing_values_and_gradient():
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 3, 5, 4)).astype(np.float32))

    def attention_like(q, k, v):
        return jnp.sum(jnp.tanh(jnp.einsum("bhqd,bhkd->bhqk", q, k)) @ v * jnp.cos(q))

    split = jax.jit(jax.value_and_grad(lambda x: attention_like(*split_qkv(x))))(qkv)
    indexed = jax.jit(jax.value_and_grad(lambda x: attention_like(x[0], x[1], x[2])))(qkv)
    np.testing.assert_array_equal(split[0], indexed[0])
    np.testing.assert_array_equal(split[1], indexed[1])
    assert [a.shape for a in split_qkv(qkv)] == [(2, 3, 5, 4)] * 3
