"""Layers with stacked parameters, for `jax.lax.scan` over depth.

A scan compiles one layer however deep the stack: the ViT blocks, the pixel decoder's encoder
layers and the masked-attention decoder's layers are each one module whose parameters carry a
leading [count] axis, applied with `nnx.split` + `lax.scan` + `nnx.merge` in the scan body.
"""

from collections.abc import Callable

from flax import nnx

from spectralmoe_jax import sharding


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs):
    """`count` independently initialised layers as one module, parameters stacked on axis 0.

    The layers are made one after another under a scan (not a vmap): the same values, but the
    random initialisers' temporaries exist for one layer at a time, which halves the peak
    memory of creating a large backbone. Logical axis names gain 'layers' in front.
    """

    @nnx.split_rngs(splits=count)
    @nnx.scan(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", sharding.METADATA_KEY: "layers"})
    def make(rngs):
        return make_layer(rngs)

    # One compiled initialiser instead of hundreds of eagerly dispatched ops.
    return nnx.jit(make)(rngs)
