"""Initialisers of the released decoder (mmdet `Mask2FormerHead.init_weights`, PyTorch defaults).

The decoder is trained from scratch, so its initial distribution is part of the recipe.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# torch.nn.init.xavier_uniform_ / xavier_normal_ (not truncated).
xavier_uniform = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
xavier_normal = nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")
# mmcv caffe2_xavier_init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)).
caffe2_xavier = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
# nn.Linear's default weight: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1 / sqrt(fan_in)).
torch_linear = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# nn.Embedding's default.
embedding = nnx.initializers.normal(1.0)


def torch_bias(fan_in: int):
    """nn.Linear's default bias: U(+-1 / sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
