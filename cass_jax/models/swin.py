"""Swin Transformer encoder (timm's `SwinTransformer` layout) as plain flax.linen modules.

The encoder of the Swin-UNet (cass_jax.models.swin_unet): patch embedding, stages of window attention with relative
position bias and shifted windows, patch merging. Submodule names mirror timm's state_dict keys (`patch_embed`,
`layers_{i}.downsample`, `layers_{i}.blocks_{j}`, `norm`) so ported ImageNet weights drop in (cass_jax.port.swin).

As in timm (>= 0.9), each stage but the first starts with a patch merging (the original Microsoft code ends each stage
with one); the function is the same. LayerNorm eps is 1e-5 and GELU exact, as torch's defaults there. Where timm pads
a feature map that is odd or not a multiple of the window, these modules raise a ValueError instead (Swin-UNet's
reference implementation cannot take such sizes either; see `swin_size_problem`). A stage whose grid is no larger
than the window uses one window of the grid's size and no shift, as timm and Swin-UNet do. Input is NHWC.
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cass_jax.models.kernel_grad import batched_matmul_function, conv_function, dense_function
from cass_jax.models.vit import Mlp, split_qkv

# torch.nn.LayerNorm's default, which timm's Swin and SSL4MIS's Swin-UNet use.
SWIN_LAYER_NORM_EPSILON = 1e-5
# Logit added between tokens of different regions in a shifted window (timm and Microsoft use -100, not -inf).
SHIFTED_WINDOW_MASK_VALUE = -100.0

# timm's and Swin-UNet's trunc_normal_(std=.02) cuts at +-2 in absolute terms, i.e. 100 standard deviations: a plain
# normal, which also compiles much faster than flax's truncated_normal (cut at 2 standard deviations).
dense_kernel_init = nn.initializers.normal(stddev=0.02)
# torch.nn.Conv2d's default kernel init (kaiming_uniform with a=sqrt(5)), which timm keeps for the patch projection.
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch.nn.Conv2d / Linear default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=SWIN_LAYER_NORM_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def dense(features: int, dtype: Any, name: str, kernel_grad: str = "auto", use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                    dot_general=dense_function(kernel_grad), name=name)


def stage_window(grid: tuple[int, int], window_size: int, shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, shift) per axis for a block on `grid`: an axis no longer than the window is one unshifted window."""
    window = tuple(side if side <= window_size else window_size for side in grid)
    shift = tuple(0 if side <= window_size or not shifted else window_size // 2 for side in grid)
    return window, shift


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """(N, N) row of the bias table for each query/key pair of a window with N = wh * ww tokens (timm's order)."""
    coords = np.stack(np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :]
    return (relative[0] + window[0] - 1) * (2 * window[1] - 1) + (relative[1] + window[1] - 1)


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B * num_windows, wh * ww, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_reverse(windows: jax.Array, window: tuple[int, int], height: int, width: int) -> jax.Array:
    """Inverse of window_partition: (B * num_windows, wh * ww, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window[0], width // window[1], window[0], window[1], channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """(num_windows, N, N) additive mask keeping attention inside the regions a cyclic shift brought together."""
    regions = np.zeros((height, width), np.float32)
    label = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[rows, cols] = label
            label += 1
    windows = regions.reshape(height // window[0], window[0], width // window[1], window[1]).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, window[0] * window[1])
    different = windows[:, None, :] != windows[:, :, None]
    return np.where(different, SHIFTED_WINDOW_MASK_VALUE, 0.0).astype(np.float32)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per example in training (timm's DropPath, scaled by keep)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class WindowAttention(nn.Module):
    """Multi-head attention inside windows, with a learned relative position bias per head (timm's layout)."""

    num_heads: int
    window: tuple[int, int]
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (B * num_windows, N, C); mask: (num_windows, N, N) or None."""
        windows, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        table = self.param("relative_position_bias_table", dense_kernel_init,
                           ((2 * self.window[0] - 1) * (2 * self.window[1] - 1), self.num_heads), jnp.float32)
        bias = table[relative_position_index(self.window).reshape(-1)].reshape(tokens, tokens, -1).transpose(2, 0, 1)
        qkv = dense(3 * dim, self.dtype, "qkv", self.kernel_grad)(x)
        qkv = qkv.reshape(windows, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = split_qkv(qkv)
        matmul = batched_matmul_function(self.kernel_grad)
        scores = matmul(q * (head_dim**-0.5), k, transpose_b=True).astype(jnp.float32) + bias
        if mask is not None:
            num_windows = mask.shape[0]
            scores = scores.reshape(-1, num_windows, self.num_heads, tokens, tokens) + mask[None, :, None]
            scores = scores.reshape(windows, self.num_heads, tokens, tokens)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = matmul(weights, v).transpose(0, 2, 1, 3).reshape(windows, tokens, dim)
        return dense(dim, self.dtype, "proj", self.kernel_grad)(out)


class SwinBlock(nn.Module):
    """Pre-norm block: x + (shifted) window attention(norm1(x)), then x + MLP(norm2(x)), on (B, H, W, C) maps."""

    num_heads: int
    window_size: int = 7
    shifted: bool = False
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, dim = x.shape
        window, shift = stage_window((height, width), self.window_size, self.shifted)
        if height % window[0] or width % window[1]:
            raise ValueError(f"Swin block got a {height}x{width} grid that {window[0]}x{window[1]} windows do not "
                             f"tile; use an image size from swin_size_problem's suggestions.")
        y = layer_norm(self.dtype, "norm1")(x)
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        mask = shifted_window_mask(height, width, window, shift) if any(shift) else None
        y = WindowAttention(self.num_heads, window, self.dtype, self.kernel_grad, name="attn")(
            window_partition(y, window), mask)
        y = window_reverse(y, window, height, width)
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + DropPath(self.drop_path)(y, train)
        mlp = Mlp(int(dim * self.mlp_ratio), self.dtype, self.kernel_grad, dense_kernel_init, name="mlp")
        return x + DropPath(self.drop_path)(mlp(layer_norm(self.dtype, "norm2")(x)), train)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: concatenate (timm's order), LayerNorm(4C), Linear(4C -> out, no bias)."""

    out_dim: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, dim).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch, height // 2, width // 2, 4 * dim)
        x = layer_norm(self.dtype, "norm")(x)
        return dense(self.out_dim, self.dtype, "reduction", self.kernel_grad, use_bias=False)(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution to `embed_dim` channels, then LayerNorm."""

    patch_size: int = 4
    embed_dim: int = 96
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = self.patch_size**2 * x.shape[-1]
        x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                    padding="VALID", dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_conv_kernel_init,
                    bias_init=torch_bias_init(fan_in), conv_general_dilated=conv_function(self.kernel_grad),
                    name="proj")(x)
        return layer_norm(self.dtype, "norm")(x)


class SwinStage(nn.Module):
    """Optional patch merging (`downsample`), then `depth` blocks alternating plain and shifted windows.

    Returns (merged, out): the stage's block input (after merging) and its output. Swin-UNet's skip connections read
    the former, timm's `forward_intermediates` the latter.
    """

    depth: int
    num_heads: int
    out_dim: int
    downsample: bool
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rates: Sequence[float] = ()
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        if self.downsample:
            x = PatchMerging(self.out_dim, self.dtype, self.kernel_grad, name="downsample")(x)
        merged = x
        for index in range(self.depth):
            x = SwinBlock(
                self.num_heads, self.window_size, shifted=index % 2 == 1, mlp_ratio=self.mlp_ratio,
                drop_path=self.drop_path_rates[index] if self.drop_path_rates else 0.0, dtype=self.dtype,
                kernel_grad=self.kernel_grad, name=f"blocks_{index}",
            )(x, train)
        return merged, x


class SwinFeatures(NamedTuple):
    """What the encoder computes, all NHWC: per stage its block input and output, and the final normed output."""

    block_inputs: list[jax.Array]
    stage_outputs: list[jax.Array]
    normed: jax.Array


def stochastic_depth_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per stage, per block: rates rising linearly from 0 to `drop_path_rate` over all blocks (timm, Swin-UNet)."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    starts = np.cumsum([0, *depths]).tolist()
    return [rates[starts[i]:starts[i + 1]] for i in range(len(depths))]


def swin_size_problem(size: int, patch_size: int, num_stages: int, window_size: int) -> str | None:
    """Why an image side of `size` does not fit a Swin with these settings, or None when it fits.

    The side must split into patches and survive num_stages - 1 patch mergings without odd grids (a multiple of
    patch_size * 2**(num_stages - 1)), and every stage's grid must be a multiple of the window or no larger than it.
    """
    unit = patch_size * 2 ** (num_stages - 1)
    if size <= 0 or size % unit:
        return f"not a multiple of {unit} (patch {patch_size} x {2 ** (num_stages - 1)} for {num_stages - 1} mergings)"
    grids = [size // patch_size // 2**stage for stage in range(num_stages)]
    bad = [grid for grid in grids if grid > window_size and grid % window_size]
    if bad:
        return (f"stage grids {tuple(grids)} must each be a multiple of the window {window_size} or at most "
                f"{window_size}, and {bad[0]} is neither")
    return None


def nearest_valid_swin_sizes(size: int, patch_size: int, num_stages: int, window_size: int) -> list[int]:
    """The closest valid image sides at or below and above `size` (one or two values)."""
    unit = patch_size * 2 ** (num_stages - 1)
    candidates = range(unit, max(4 * size, 64 * unit) + 1, unit)
    valid = [c for c in candidates if swin_size_problem(c, patch_size, num_stages, window_size) is None]
    below = [c for c in valid if c <= size]
    above = [c for c in valid if c > size]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


class SwinTransformer(nn.Module):
    """Swin Transformer encoder: patch embedding, stages (patch merging at the start of all but the first), final norm.

    Returns SwinFeatures. Defaults are Swin-T (`swin_tiny_patch4_window7_224`: embed 96, depths 2-2-6-2, heads
    3-6-12-24, window 7); there is no classifier head. `train=True` enables stochastic depth (rng "dropout").
    """

    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**stage for stage in range(len(self.depths))]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> SwinFeatures:
        if x.ndim != 4:
            raise ValueError(f"Swin expects NHWC input (B, H, W, C), got shape {x.shape}.")
        for side in x.shape[1:3]:
            problem = swin_size_problem(side, self.patch_size, len(self.depths), self.window_size)
            if problem:
                nearest = nearest_valid_swin_sizes(side, self.patch_size, len(self.depths), self.window_size)
                raise ValueError(f"Swin cannot take an image side of {side}: {problem}; nearest valid sides: "
                                 f"{', '.join(map(str, nearest))}.")
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, self.kernel_grad, name="patch_embed")(
            x.astype(self.dtype))
        rates = stochastic_depth_rates(self.drop_path_rate, self.depths)
        block_inputs, stage_outputs = [], []
        for stage, (depth, heads, dim) in enumerate(zip(self.depths, self.num_heads, self.stage_dims)):
            merged, x = SwinStage(
                depth, heads, dim, downsample=stage > 0, window_size=self.window_size, mlp_ratio=self.mlp_ratio,
                drop_path_rates=tuple(rates[stage]), dtype=self.dtype, kernel_grad=self.kernel_grad,
                name=f"layers_{stage}",
            )(x, train)
            block_inputs.append(merged)
            stage_outputs.append(x)
        return SwinFeatures(block_inputs, stage_outputs, layer_norm(self.dtype, "norm")(x))
