"""The released CLIP wrapper's trainable feature pyramid (`fpn1`..`fpn4` of SpectralMoE /
Rein `clip.py`, patch 16), in place of the plain bilinear x4, x2, x1, x0.5 resizing:

  fpn1  GroupNorm(1) -> ConvTranspose 2x2/2 -> SyncBatchNorm -> GELU -> ConvTranspose 2x2/2  (x4)
  fpn2  GroupNorm(1) -> ConvTranspose 2x2/2                                                   (x2)
  fpn3  GroupNorm(1)                                                                          (x1)
  fpn4  GroupNorm(1) -> MaxPool 2x2/2                                                         (x0.5)

It trains with the adapter (the wrapper's `set_requires_grad(self, ["fpn", "depthmoe"])`); the
paper's parameter counts leave it out. The batch norm normalises with the batch statistics in
training (SyncBatchNorm: over the global batch, which a sharded batch axis gives here) and with
its running statistics in evaluation; in training it updates them as PyTorch (momentum 0.1,
unbiased variance). Maps are NHWC; all statistics in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

_EPS = 1e-5  # torch GroupNorm / BatchNorm default


class GroupNorm1(nnx.Module):
    """torch GroupNorm(1, C): statistics over (H, W, C) of each image, per-channel affine."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + _EPS) * self.scale[...] + self.bias[...]


class ConvTranspose2x2(nnx.Module):
    """torch ConvTranspose2d(C, C, 2, stride=2): out[2y + i, 2x + j] = in[y, x] @ W[i, j] + b.
    The kernel is stored [i, j, in, out] (torch's [in, out, i, j] permuted (2, 3, 0, 1))."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, channels, channels)))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        y = jnp.einsum("byxc,ijco->byixjo", x, self.kernel[...].astype(x.dtype))
        return rearrange(y, "b y i x j o -> b (y i) (x j) o") + self.bias[...].astype(x.dtype)


class BatchNorm(nnx.Module):
    """torch BatchNorm2d / SyncBatchNorm over (B, H, W) of NHWC maps."""

    def __init__(self, channels: int, momentum: float = 0.1):
        self.momentum = momentum
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            count = x.shape[0] * x.shape[1] * x.shape[2]
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            unbiased = jax.lax.stop_gradient(var) * count / max(count - 1, 1)
            self.var[...] = (1 - m) * self.var[...] + m * unbiased
        else:
            mean, var = self.mean[...], self.var[...]
        return (x - mean) * jax.lax.rsqrt(var + _EPS) * self.scale[...] + self.bias[...]


def _max_pool2(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class CLIPFeaturePyramid(nnx.Module):
    """Four [B, h, w, C] maps -> the same at x4, x2, x1 and x0.5 (`clip.py` fpn1..fpn4)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norms = nnx.List([GroupNorm1(channels) for _ in range(4)])
        self.up4_a = ConvTranspose2x2(channels, rngs=rngs)
        self.up4_bn = BatchNorm(channels)
        self.up4_b = ConvTranspose2x2(channels, rngs=rngs)
        self.up2 = ConvTranspose2x2(channels, rngs=rngs)

    def __call__(self, features, train: bool = False):
        f1, f2, f3, f4 = (norm(f) for norm, f in zip(self.norms, features))
        f1 = self.up4_b(jax.nn.gelu(self.up4_bn(self.up4_a(f1), train), approximate=False))
        return [f1, self.up2(f2), f3, _max_pool2(f4)]
