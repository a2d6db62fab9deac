"""Vision Transformer (timm's VisionTransformer with class-token pooling) as plain flax.linen modules.

Pre-norm blocks with LayerNorm eps 1e-6, fused qkv projection and exact (erf) GELU, as timm: Flax's
default `nn.gelu` is the tanh approximation and would not match the PyTorch weights. Attention is
plain einsum attention with the softmax in float32. Input is NHWC.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cass_jax import onednn
from cass_jax.models.kernel_grad import dense_function, onednn_conv, resolve_kernel_grad

dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, dtype: Any, name: str, kernel_grad: str = "auto") -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_kernel_init, name=name,
                    dot_general=dense_function(kernel_grad))


@jax.custom_vjp
def exact_gelu(x: jax.Array) -> jax.Array:
    """x * Phi(x) with Phi = (1 + erf(x / sqrt 2)) / 2, torch.nn.GELU()'s formula; its gradient reuses Phi.

    Autodiff of `nn.gelu(x, approximate=False)` recomputes erfc in the backward pass, 3.5x slower on XLA:CPU
    for a ViT MLP activation. Values agree with it to 1e-6 (it is more exact only in the far negative tail).
    """
    return _exact_gelu_forward(x)[0]


def _exact_gelu_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return x * cdf, (x, cdf)


def _exact_gelu_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
    x, cdf = residuals
    density = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return (grad * (cdf + x * density),)


exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """torch's bicubic tap weights for offsets -1, 0, 1, 2 at fractional position t (Keys kernel, a = -0.75)."""
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """(out_size, in_size) matrix of torch's `interpolate(mode="bicubic", scale_factor=...)` along one axis.

    align_corners=False with an explicit scale factor: output i reads input (i + 0.5) / scale_factor - 0.5,
    four taps, indices clamped at the border (torch's upsample_bicubic2d). A matrix, so a 2-D resize is two
    small matmuls that XLA fuses and differentiates.
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        source = (i + 0.5) / scale_factor - 0.5
        start = math.floor(source)
        for offset, weight in zip(range(-1, 3), _cubic_weights(source - start)):
            matrix[i, min(max(start + offset, 0), in_size - 1)] += weight
    return matrix


def interpolate_position_embeddings(pos_embed: jax.Array, grid_height: int, grid_width: int) -> jax.Array:
    """(1, 1 + g*g, D) embeddings -> (1, 1 + grid_height * grid_width, D), as DINO's `interpolate_pos_encoding`.

    The class token's embedding is kept; the g x g grid is resized bicubically (torch's kernel) with DINO's
    scale factor (grid + 0.1) / g, the 0.1 guarding the output size against rounding. A ViT built for 224 px
    crops can then also read DINO's 96 px local crops.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    rows = torch_bicubic_matrix(side, grid_height, (grid_height + 0.1) / side)
    columns = torch_bicubic_matrix(side, grid_width, (grid_width + 0.1) / side)
    grid = pos_embed[0, 1:].reshape(side, side, -1).astype(jnp.float32)
    resized = jnp.einsum("ij,jkd,lk->ild", jnp.asarray(rows, jnp.float32), grid, jnp.asarray(columns, jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    resized = resized.reshape(1, grid_height * grid_width, -1).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], resized], axis=1)


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k and v from a (3, ...) stack. `lax.split`'s gradient is one concatenation, where indexing's is three
    zero-padded copies summed. On XLA:CPU a ViT-Tiny attention's forward + backward takes 5-8% less time for 197
    tokens and ~20% less for 37 (one core), the whole DINO ViT-Tiny step ~1% (2 threads); gradients bitwise equal."""
    q, k, v = (part[0] for part in jax.lax.split(qkv, (1, 1, 1), axis=0))
    return q, k, v


class Attention(nn.Module):
    """Multi-head self-attention with one fused `qkv` Dense (timm's layout) and an output `proj`."""

    num_heads: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, class_token_only: bool = False) -> jax.Array:
        """Attends from every token, or only from the class token (output [batch, 1, dim]) when asked."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = dense(3 * dim, self.dtype, "qkv", self.kernel_grad)(x)
        if resolve_kernel_grad(self.kernel_grad) == "onednn" and qkv.dtype == jnp.float32:
            # oneDNN reads q, k, v in place and writes the output where proj reads it: no transposes or copies.
            out = onednn.attention(qkv, self.num_heads, head_dim**-0.5, 1 if class_token_only else tokens)
            return dense(dim, self.dtype, "proj", self.kernel_grad)(out)
        # (3, batch, heads, tokens, head_dim): both attention products then run with heads as a batch axis and
        # no further transposes (forward + backward 20% faster on XLA:CPU than einsums over (b, t, h, d)).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = split_qkv(qkv)
        if class_token_only:
            q = q[:, :, :1]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q * (head_dim**-0.5), k)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, q.shape[2], dim)
        return dense(dim, self.dtype, "proj", self.kernel_grad)(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's Mlp; the Swin models pass their own kernel initialiser)."""

    hidden_dim: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"
    kernel_init: Any = dense_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def linear(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init,
                            dot_general=dense_function(self.kernel_grad), name=name)

        y = exact_gelu(linear(self.hidden_dim, "fc1")(x))
        return linear(x.shape[-1], "fc2")(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, class_token_only: bool = False) -> jax.Array:
        """All tokens out, or only the class token ([batch, 1, dim]): what the pooled output of a last block needs."""
        attended = Attention(self.num_heads, self.dtype, self.kernel_grad, name="attn")(
            layer_norm(self.dtype, "norm1")(x), class_token_only)
        x = (x[:, :1] if class_token_only else x) + attended
        return x + Mlp(self.mlp_dim, self.dtype, self.kernel_grad, name="mlp")(layer_norm(self.dtype, "norm2")(x))


class VisionTransformer(nn.Module):
    """ViT with patch embedding, class token, learned position embeddings, final norm and `head`.

    The position-embedding shape follows `img_size`; inputs of another size raise a ValueError
    (load_pretrained_variables resamples position embeddings when sizes differ), unless
    `interpolate_pos_encoding`: then any size that is a multiple of the patch size is read with the
    embeddings interpolated on the fly (`interpolate_position_embeddings`, DINO's multi-crop); inputs of
    `img_size` take the same path as without it. Returns logits,
    or the class-token features when num_classes == 0; `return_features=True` gives (logits, features).
    `train` is accepted for interface parity with ResNet; there is no dropout.

    `last_block_class_token_only` (default on): only the class token leaves the last block, the only token the
    output depends on, so that block skips the other tokens' attention queries, proj and MLP. Outputs and
    gradients are the same; ViT-B/16 does about 6% fewer FLOPs per step (BENCHMARKS.md). Turn it off to read
    every token of the last block (e.g. with `capture_intermediates`).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    dtype: Any = jnp.float32
    # Which kernels the Dense layers and attention run (models.kernel_grad): "auto", "onednn", "matmul" or "xla".
    kernel_grad: str = "auto"
    last_block_class_token_only: bool = True
    interpolate_pos_encoding: bool = False

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViT img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; "
                f"choose an image size divisible by {self.patch_size}."
            )
        native = x.ndim == 4 and x.shape[1:3] == (self.img_size, self.img_size)
        if self.interpolate_pos_encoding and x.ndim == 4 and not native:
            if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
                raise ValueError(f"ViT input of {x.shape[1]}x{x.shape[2]} px is not a multiple of patch_size="
                                 f"{self.patch_size}; crop to a multiple of {self.patch_size}.")
        elif not native:
            raise ValueError(
                f"ViT built for NHWC input of {self.img_size}x{self.img_size}, got shape {x.shape}; "
                f"create the model with img_size={x.shape[1] if x.ndim == 4 else '...'} "
                f"(pretrained position embeddings are resampled by load_pretrained_variables)."
            )
        x = x.astype(self.dtype)
        x = nn.Conv(
            self.embed_dim, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
            padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
            # oneDNN's patch embedding (when chosen) is faster; matmul_grad_conv's forms do not help a 16x16/16 one.
            conv_general_dilated=onednn_conv if resolve_kernel_grad(self.kernel_grad) == "onednn" else None,
            name="patch_embed",
        )(x)
        batch, grid_shape = x.shape[0], x.shape[1:3]
        x = x.reshape(batch, -1, self.embed_dim)
        cls_token = self.param("cls_token", nn.initializers.normal(stddev=1e-6), (1, 1, self.embed_dim))
        pos_embed = self.param(
            "pos_embed", nn.initializers.truncated_normal(stddev=0.02), (1, self.grid_size**2 + 1, self.embed_dim)
        )
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.embed_dim)), x], axis=1)
        if not native:
            pos_embed = interpolate_position_embeddings(pos_embed, *grid_shape)
        x = x + pos_embed.astype(self.dtype)
        mlp_dim = int(self.embed_dim * self.mlp_ratio)
        for index in range(self.depth):
            last = index == self.depth - 1
            x = EncoderBlock(self.num_heads, mlp_dim, self.dtype, self.kernel_grad, name=f"blocks_{index}")(
                x, class_token_only=last and self.last_block_class_token_only)
        x = layer_norm(self.dtype, "norm")(x)
        features = x[:, 0]
        if self.num_classes:
            logits = dense(self.num_classes, self.dtype, "head", self.kernel_grad)(features)
        else:
            logits = features
        return (logits, features) if return_features else logits


VIT_WIDTHS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
