"""FADA (JingjunYi/FADA, `rein/models/backbones/reins.py`, `Reins.forward` "oursv3" with
`LoRAReins`; released as "partial" code): a Haar wavelet split of the features, REIN's token
refinement on the low-frequency part and, with instance-normalised logits, on the high one.

After block l, for the patch tokens as the released code holds them, sequence-first F [N, G, d]
(G the samples of one GPU's batch), c = d / 4, h = w = sqrt(N):

  X              = reshape(F, [G, d, h, w])            a flat reinterpretation, not a permute
  LL, LH, HL, HH = WavePool(X)                         fixed depthwise 2 x 2 stride-2 Haar kernels
  f_low          = reshape(LL, [N, G, c])
  f_high         = reshape(concat_last(reshape(LH | HL | HH, [G, N, c])), [N, G, 3c])
  d_low          = Linear_delta(softmax(f_low T1^T / sqrt d)[1:] Linear_t2f(T1[1:]) + f_low)
  d_high         = Linear_delta2(softmax(IN(f_high T2^T) / sqrt d)[1:] Linear_t2f2(T2[1:]) + f_high)
  f_out          = F + scale * concat_last(d_low, d_high)            no inverse transform
  T1 = A_l B_l [m, c], T2 = A2_l B2_l [m, 3c] (low rank); IN: instance norm over the m logits.

What this computes, kept as released (docs/methods.md): at the released operating point N = d
(512 px crops, patch 16, ViT-L) each token's d channels are laid out as a sqrt(d) x sqrt(d)
grid and split by the Haar transform in channel space, token by token; for N != d the reshapes
mix tokens and the samples of a group (`sample_group_train` / `sample_group_eval`, as SET).
The Haar kernels are fixed here (the released `set_requires_grad` makes them trainable by
accident of their name: 16,384 more parameters). Queries come from the low set. 2,045,441
parameters on ViT-L (the paper's Table 3 says 11.65 M).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.errors import ConfigError
from spectralmoe_jax.models.adapters import token_sets
from spectralmoe_jax.models.adapters.set_adapter import sample_groups, ungroup
from spectralmoe_jax.models.spectral_moe import AdapterConfig


def haar(x: jax.Array) -> tuple[jax.Array, ...]:
    """`WavePool` on [..., h, w]: the 2 x 2 stride-2 cross-correlations with (1/2) [[1, 1],
    [1, 1]] (LL), [[-1, 1], [-1, 1]] (LH), [[-1, -1], [1, 1]] (HL), [[1, -1], [-1, 1]] (HH)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (0.5 * (a + b + c + d), 0.5 * (-a + b - c + d), 0.5 * (-a - b + c + d),
            0.5 * (a - b - c + d))


def wavelet_split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The released reshape chain on groups x [n, N, G, C] -> (f_low [n, N, G, C/4],
    f_high [n, N, G, 3 C/4])."""
    groups, tokens, group, width = x.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side % 2:
        raise ConfigError(
            f"FADA (model.adapter.kind='fada') reshapes the patch tokens into a square grid with "
            f"an even side, as released; {tokens} tokens are not one: use square inputs whose "
            f"patch grid has an even side (eval.mode='slide' with a square window)")
    c = width // 4
    bands = haar(x.reshape(groups, group, width, side, side))
    flat = [band.reshape(groups, group, tokens, c) for band in bands]
    low = flat[0].reshape(groups, tokens, group, c)
    high = jnp.concatenate(flat[1:], axis=-1).reshape(groups, tokens, group, 3 * c)
    return low, high


class FADA(token_sets.TokenAdapter):
    """Low set: learnable_tokens_a [L, m, r], learnable_tokens_b [L, r, d/4], mlp_token2feat,
    mlp_delta_f (d/4). High set: learnable_tokens_a2 [L, m, r], learnable_tokens_b2
    [L, r, 3d/4], mlp_token2feat2, mlp_delta_f2 (3d/4). Shared: scale, transform (d/4 -> q),
    merge (released names; the fixed `wavepool` kernels are not parameters)."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        c = config
        low, high = c.width // 4, 3 * (c.width // 4)
        self._shared(c, low, rngs)
        # The released bound names the ViT width for the low set and 3d/4 for the high one.
        self.learnable_tokens_a, self.learnable_tokens_b = token_sets.lora_tokens(
            c.num_layers, c.num_tokens, c.rank, low, patch_size=c.patch_size,
            bound_width=c.width, rngs=rngs)
        self.learnable_tokens_a2, self.learnable_tokens_b2 = token_sets.lora_tokens(
            c.num_layers, c.num_tokens, c.rank, high, patch_size=c.patch_size,
            bound_width=high, rngs=rngs)
        self.mlp_token2feat, self.mlp_delta_f = self.linears(low, rngs)
        self.mlp_token2feat2, self.mlp_delta_f2 = self.linears(high, rngs)

    def __call__(self, layer_index, f_v, f_d=None, *, train: bool, rng=None):
        c = self.config
        token_sets.check_features("FADA", f_v, c.width)
        group = c.sample_group_train if train else c.sample_group_eval
        dtype, scale = c.dtype, 1.0 / math.sqrt(c.width)
        low, high = wavelet_split(sample_groups(f_v.astype(dtype), group, "FADA"))
        flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])  # noqa: E731 [.., N, G, c] -> [.., N G, c]
        at = lambda p: token_sets.at_layer(p, layer_index)  # noqa: E731

        low_tokens = at(self.learnable_tokens_a) @ at(self.learnable_tokens_b)
        logits = token_sets.token_logits(flat(low), low_tokens) * scale
        d_low = token_sets.refine(flat(low), logits, low_tokens, self.mlp_token2feat,
                                  self.mlp_delta_f)
        high_tokens = at(self.learnable_tokens_a2) @ at(self.learnable_tokens_b2)
        logits = token_sets.instance_norm(token_sets.token_logits(flat(high), high_tokens)) * scale
        d_high = token_sets.refine(flat(high), logits, high_tokens, self.mlp_token2feat2,
                                   self.mlp_delta_f2)
        delta = jnp.concatenate([d_low.reshape(low.shape), d_high.reshape(high.shape)], axis=-1)
        return self.refined(f_v, ungroup(delta)), {}

    def query_tokens(self):
        return self.learnable_tokens_a[...] @ self.learnable_tokens_b[...]
