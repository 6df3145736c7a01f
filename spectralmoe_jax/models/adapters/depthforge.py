"""DepthForge (anonymouse-xzrptkvyqc/DepthForge, `depthforge/models/backbones/depthforge.py`,
`DepthForgeReins`): REIN's low-rank tokens, attended by the visual and the depth patch tokens.

After VFM block l, with its patch tokens f and the frozen depth encoder's block-l patch tokens
f_d (cls dropped; `depthv2_dinov2.py` feeds every block output of PromptDA's ViT-L):

  a     = softmax_m(f T_l^T / sqrt d + f_d T_l^T / sqrt d),   T_l = A_l B_l
  delta = Linear_delta(a[..., 1:] Linear_t2f(T_l[1:]) + f)    depth enters only the logits
  f_out = f + scale * delta

Parameters and count are REIN's (2,990,081 on ViT-L); the released head adds the Dynamic Query
Correction Module (`models/mask2former/query_correction.py`, `decoder.query_correction`).
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from spectralmoe_jax.models.adapters import token_sets
from spectralmoe_jax.models.spectral_moe import AdapterConfig


class DepthForge(token_sets.TokenAdapter):
    """learnable_tokens_a [L, m, r], learnable_tokens_b [L, r, d], mlp_token2feat, mlp_delta_f
    (d -> d), scale, transform, merge: the released names."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        self._shared(config, config.width, rngs)
        self._rein_set(rngs)

    def tokens(self, layer_index) -> jax.Array:
        return (token_sets.at_layer(self.learnable_tokens_a, layer_index)
                @ token_sets.at_layer(self.learnable_tokens_b, layer_index))

    def __call__(self, layer_index, f_v, f_d=None, *, train: bool, rng=None):
        c = self.config
        token_sets.check_features("DepthForge", f_v, c.width)
        if f_d is None or f_d.shape != f_v.shape:
            raise ValueError(f"DepthForge needs depth tokens of the visual tokens' shape "
                             f"{f_v.shape}, got {None if f_d is None else f_d.shape}")
        dtype = c.dtype
        f, depth = f_v.astype(dtype), f_d.astype(dtype)
        tokens = self.tokens(layer_index)
        scale = 1.0 / math.sqrt(c.width)
        logits = (token_sets.token_logits(f, tokens) * scale
                  + token_sets.token_logits(depth, tokens) * scale)
        delta = token_sets.refine(f, logits, tokens, self.mlp_token2feat, self.mlp_delta_f)
        return self.refined(f_v, delta), {}

    def query_tokens(self):
        return self.learnable_tokens_a[...] @ self.learnable_tokens_b[...]
