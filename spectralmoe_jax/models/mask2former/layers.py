"""Small building blocks shared by the pixel decoder and the transformer decoder."""

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models import resize
from spectralmoe_jax.models.mask2former import initializers


def linear(
    in_features: int,
    out_features: int,
    *,
    kernel_init=initializers.torch_linear,
    bias_init=None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """nnx.Linear with PyTorch's default initialisation unless told otherwise."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=kernel_init,
        bias_init=bias_init or initializers.torch_bias(in_features),
        dtype=dtype,
        rngs=rngs,
    )


def layer_norm(dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """PyTorch's nn.LayerNorm: eps 1e-5, two-pass variance."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs)


def resize_bilinear(x, shape):
    """F.interpolate(mode="bilinear", align_corners=False) without antialiasing, to `shape`."""
    return resize.resize_bilinear(x, shape)


class FFN(nnx.Module):
    """Linear -> ReLU -> Linear (mmcv FFN `layers.0.0` / `layers.1`; HF fc1 / fc2).

    Weights xavier-normal as mmdet's init of the encoder and decoder layers; biases PyTorch's.
    """

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = linear(
            dim, hidden, kernel_init=initializers.xavier_normal, dtype=dtype, rngs=rngs
        )
        self.fc2 = linear(
            hidden, dim, kernel_init=initializers.xavier_normal, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


class ConvNorm(nnx.Module):
    """Conv -> GroupNorm (-> ReLU), NHWC: mmcv `ConvModule` with GN (`conv`, `gn`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        use_bias: bool,
        relu: bool,
        num_groups: int,
        kernel_init,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        pad = kernel_size // 2
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            padding=((pad, pad), (pad, pad)),
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=nnx.initializers.zeros,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = nnx.GroupNorm(
            out_channels,
            num_groups=num_groups,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.relu = relu

    def __call__(self, x):
        x = self.norm(self.conv(x))
        return jax.nn.relu(x) if self.relu else x
