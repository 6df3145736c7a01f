"""AdaptFormer (Chen et al. NeurIPS 2022; ShoufaChen/AdaptFormer `models/adapter.py` `Adapter`,
`models/custom_modules.py` `Block.forward` with ffn_option='parallel'): a bottleneck MLP beside
each frozen block's MLP.

  x   = x + ls1(attn(norm1 x))
  a   = s up(dropout(relu(down(LN_a(x)))))        LN_a: adapter_layernorm_option 'in'
  out = x + ls2(mlp(norm2 x)) + a                 the branch reads the stream before norm2

down: Linear d -> 64 (kaiming_uniform weight, zero bias), up: Linear 64 -> d (zeros), the
released `init_option='lora'`, so training starts at the frozen model. The paper's Table 3 count
(3.22 M on ViT-L) is bottleneck 64 with the Adapter's LayerNorm (its class default 'in'):
24 x (2 x 64 x 1024 + 64 + 1024 + 2 x 1024) = 3,220,992; the released image config turns the
LayerNorm off (3.17 M) and sets s = 0.1, which we keep. The branch is added outside DINOv3's
LayerScale (whose 1e-5 would silence it; the paper does not say where its authors put it).
Touches every token; the decoder is the plain Mask2Former head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.adapters import taps as taps_lib
from spectralmoe_jax.models.spectral_moe import AdapterConfig, _uniform
from spectralmoe_jax.models.stacking import stacked
from spectralmoe_jax.models.vit import BlockTaps

LAYERNORMS = ("in", "out", "none")


class AdapterLayer(nnx.Module):
    """One block's adapter: `adapter_norm` (nn.LayerNorm(d), eps 1e-5), down_proj, up_proj."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        d, h, dtype = config.width, config.adaptformer_bottleneck, config.dtype
        self.adapter_norm = (
            nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, use_fast_variance=False, rngs=rngs)
            if config.adaptformer_layernorm != "none" else None)
        self.down_proj = nnx.Linear(d, h, dtype=dtype, kernel_init=_uniform(1.0 / math.sqrt(d)),
                                    bias_init=nnx.initializers.zeros, rngs=rngs)
        self.up_proj = nnx.Linear(h, d, dtype=dtype, kernel_init=nnx.initializers.zeros,
                                  bias_init=nnx.initializers.zeros, rngs=rngs)


class AdaptFormer(taps_lib.InBlockAdapter):
    """The parallel adapters of all blocks (`layers`, stacked), at the ViT's 'mlp' site."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        if config.adaptformer_layernorm not in LAYERNORMS:
            raise ValueError(f"AdapterConfig.adaptformer_layernorm="
                             f"{config.adaptformer_layernorm!r}: expected one of {LAYERNORMS}")
        self.config = config
        self.layers = stacked(lambda rngs: AdapterLayer(config, rngs=rngs), config.num_layers,
                              rngs)

    def block_taps(self, *, train: bool, rng=None) -> BlockTaps:
        c = self.config
        keyed = train and c.adaptformer_dropout > 0
        params = taps_lib.scan_params(self.layers, rng=rng if keyed else None,
                                      num_layers=c.num_layers)
        return BlockTaps(params=params, sites=frozenset({"mlp"}), delta=self.delta)

    def delta(self, site: str, p, x: jax.Array) -> jax.Array:
        c = self.config
        layer = taps_lib.layer_module(self.layers, p)
        if c.adaptformer_layernorm == "in":
            x = layer.adapter_norm(x)
        down = jax.nn.relu(layer.down_proj(x.astype(c.dtype)))
        up = layer.up_proj(taps_lib.dropout(down, c.adaptformer_dropout, p))
        up = up.astype(jnp.float32) * c.adaptformer_scale
        if c.adaptformer_layernorm == "out":
            up = layer.adapter_norm(up).astype(jnp.float32)
        return up
