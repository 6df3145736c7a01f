"""Resampling of weight arrays exactly as PyTorch does it, and multispectral stem adaptation.

`torch.nn.functional.interpolate(mode='bicubic' | 'bilinear' | 'linear', align_corners=False)` is
separable, so each axis is one [out, in] matrix. The linear kernel (no antialias) takes the source
coordinate (i + 0.5) * scale - 0.5, clamped at 0, and its two neighbours. Two bicubic kernels
exist and are not the same as `jax.image.resize`:
- antialias=False: Keys cubic convolution with a = -0.75, source coordinate
  (i + 0.5) * scale - 0.5, out-of-range taps clamped to the border;
- antialias=True (PIL-style): cubic with a = -0.5, support widened by the scale when
  downsampling, taps outside the input dropped and the weights renormalised.
`scale` is in/out, or 1/scale_factor when a scale factor is given (DINOv2's 0.1 offset).

Used by the ViT at trace time (position embedding to the input grid; SAM's relative position
tables to the attention grid) and by the converters (patch kernel 14 -> 16, position embedding to
the target grid, as the released SpectralMoE `tools/convert_models` and backbone wrappers do).
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, *, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
    """[n_out, n_in] float64 matrix of torch's bicubic interpolation along one axis."""
    scale = 1.0 / scale_factor if scale_factor else n_in / n_out
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if not antialias:
        source = scale * (rows + 0.5) - 0.5
        base = np.floor(source)
        t = source - base
        for tap, distance in enumerate((t + 1, t, 1 - t, 2 - t)):
            index = np.clip(base.astype(int) - 1 + tap, 0, n_in - 1)
            np.add.at(matrix, (rows, index), _cubic(distance, -0.75))
        return matrix
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in rows:
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        weights = _cubic((taps - centre + 0.5) * inv_scale, -0.5)
        total = weights.sum()
        matrix[i, taps] = weights / total if total != 0 else weights
    return matrix


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 matrix of torch's (bi)linear interpolation along one axis
    (align_corners=False, no antialias): what 'bilinear' does per axis and 'linear' in 1-D."""
    scale = n_in / n_out
    source = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    weight = source - low
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix


def interpolation_matrix(n_in: int, n_out: int, mode: str = "bicubic", *,
                         scale_factor: float | None = None, antialias: bool = False) -> np.ndarray:
    """[n_out, n_in] matrix of torch `interpolate` along one axis: 'bicubic' or 'bilinear'."""
    if mode == "bicubic":
        return bicubic_matrix(n_in, n_out, scale_factor=scale_factor, antialias=antialias)
    if mode == "bilinear":
        if scale_factor or antialias:
            raise ValueError("bilinear interpolation takes no scale factor or antialias here")
        return linear_matrix(n_in, n_out)
    raise ValueError(f"interpolation mode {mode!r}: expected 'bicubic' or 'bilinear'")


def resize_bicubic(x: np.ndarray, size: tuple[int, int], *, axes: tuple[int, int] = (0, 1),
                   scale_factor: tuple[float, float] | None = None,
                   antialias: bool = False) -> np.ndarray:
    """Resizes two axes of x like torch bicubic interpolate (align_corners=False)."""
    out = np.asarray(x, dtype=np.float64)
    for axis, n_out, factor in zip(axes, size, scale_factor or (None, None)):
        matrix = bicubic_matrix(out.shape[axis], n_out, scale_factor=factor, antialias=antialias)
        out = np.moveaxis(np.tensordot(matrix, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out.astype(np.asarray(x).dtype)


def resize_patch_kernel(kernel: np.ndarray, patch_size: int) -> np.ndarray:
    """HWIO patch-embedding kernel resized bicubically to patch_size x patch_size (14 -> 16)."""
    return resize_bicubic(kernel, (patch_size, patch_size), axes=(0, 1))


def resize_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int], *, num_prefix: int = 1,
                     source_grid: tuple[int, int] | None = None,
                     mode: str = "bicubic") -> np.ndarray:
    """[P + h*w, D] position table: the patch part resized to `grid` ('bicubic', or 'bilinear'
    as the released CLIP wrapper's `init_weights`), prefix rows kept."""
    prefix, patches = pos_embed[:num_prefix], pos_embed[num_prefix:]
    if source_grid is None:
        side = math.isqrt(patches.shape[0])
        if side * side != patches.shape[0]:
            raise ValueError(f"position table of {patches.shape[0]} patches is not square; "
                             "pass source_grid")
        source_grid = (side, side)
    out = patches.reshape(*source_grid, -1).astype(np.float64)
    for axis, (n_in, n_out) in enumerate(zip(source_grid, grid)):
        matrix = interpolation_matrix(n_in, n_out, mode)
        out = np.moveaxis(np.tensordot(matrix, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    out = out.astype(pos_embed.dtype).reshape(-1, patches.shape[-1])
    return np.concatenate([prefix, out], axis=0)


def adapt_stem_cyclic(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """Released SpectralMoE stem: input channel i copies pretrained channel i mod C (HWIO)."""
    index = np.arange(in_channels) % kernel.shape[2]
    return kernel[:, :, index, :]


def adapt_stem_timm(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """timm `adapt_input_conv` for an RGB kernel (HWIO): sum for 1 channel, else repeat the
    RGB channels and rescale by 3 / C so the response to a grey input is unchanged."""
    if kernel.shape[2] != 3:
        raise ValueError(f"timm stem adaptation needs a 3-channel kernel, got {kernel.shape[2]}")
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    if in_channels == 3:
        return kernel
    return adapt_stem_cyclic(kernel, in_channels) * np.float32(3 / in_channels)


def resize_bilinear(x, shape: tuple[int, ...]):
    """`F.interpolate(mode='bilinear', align_corners=False)` without antialiasing, to `shape`:
    equal to `jax.image.resize(x, shape, 'linear', antialias=False)`.

    Each resized axis whose sizes differ by an integer factor k is resampled from shifted copies
    (half-pixel centres: up by k, output phase r lies at offset (r + 0.5) / k - 0.5 from its
    source pixel, between it and one neighbour, the border replicated; down by k, the output
    sits on a source pixel (k odd) or midway between two (k even)). jax.image.resize contracts
    each axis with a weight matrix instead, which the GPU program brackets with transposes (in
    the forward and the backward, issue 20). Other ratios fall back to jax.image.resize.
    """
    import jax
    import jax.numpy as jnp

    if x.ndim != len(shape):
        raise ValueError(f"resize_bilinear: input {x.shape} and target {shape} differ in rank")
    for axis, (n_in, n_out) in enumerate(zip(x.shape, shape)):
        if n_in == n_out:
            continue
        if n_out % n_in == 0:
            x = _upsample_axis(x, axis, n_out // n_in, jnp)
        elif n_in % n_out == 0:
            x = _downsample_axis(x, axis, n_in // n_out, jnp)
        else:
            x = jax.image.resize(x, (*x.shape[:axis], n_out, *x.shape[axis + 1:]), "linear",
                                 antialias=False)
    return x


def _upsample_axis(x, axis: int, factor: int, jnp):
    from jax import lax

    n = x.shape[axis]
    first, last = lax.slice_in_dim(x, 0, 1, axis=axis), lax.slice_in_dim(x, n - 1, n, axis=axis)
    # The neighbours on either side, border pixels replicated (static slices, no gather).
    previous = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    following = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    phases = []
    for r in range(factor):
        offset = (r + 0.5) / factor - 0.5  # in (-0.5, 0.5): the neighbour is one pixel away
        neighbour = previous if offset < 0 else following
        phases.append((1.0 - abs(offset)) * x + abs(offset) * neighbour)
    out = jnp.stack(phases, axis=axis + 1)
    return out.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1:])


def _downsample_axis(x, axis: int, factor: int, jnp):
    from jax import lax

    n = x.shape[axis]
    blocks = x.reshape(*x.shape[:axis], n // factor, factor, *x.shape[axis + 1:])
    middle = factor // 2  # output i samples source position factor * i + (factor - 1) / 2
    pick = lambda index: lax.index_in_dim(blocks, index, axis=axis + 1, keepdims=False)  # noqa: E731
    if factor % 2:
        return pick(middle)
    return 0.5 * (pick(middle - 1) + pick(middle))
