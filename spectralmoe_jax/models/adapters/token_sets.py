"""What REIN's descendants share: learnable token sets attended by the patch tokens.

w1oves/Rein `Reins.forward_delta_feat`, which SET, FADA and DepthForge reuse with other inputs
(docs/methods.md): for tokens T [m, c] and features f [B, N, c] of one layer,

  a     = softmax_m(logits)        logits = f T^T / sqrt(d) (d the ViT width, whatever c is)
  Delta = a[..., 1:] (T[1:] W_t2f + b_t2f)       token 0 is an attention sink: no value
  delta = Linear_delta(Delta + f)

and the refined tokens are f + scale * delta, `scale` one learned scalar. The queries of the
released heads come from the tokens (`spectral_moe.linked_queries`). SpectralMoE / REIN compute
the same attention on expert coordinates (`spectral_moe.py`); these methods need d-wide or
c-wide values, so they form the tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.spectral_moe import (AdapterConfig, _torch_linear, _uniform,
                                                 linked_queries)


def lora_tokens(layers: int, tokens: int, rank: int, width: int, *, patch_size: int,
                bound_width: int, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """`LoRAReins` tokens T = A B: A [L, m, r], B [L, r, c], both U(+-sqrt(6 / (3 p^2 +
    sqrt(bound_width r)))) (the released bound names the ViT width, or FADA's 3d/4)."""
    bound = math.sqrt(6.0 / (3 * patch_size**2 + math.sqrt(bound_width * rank)))
    init = _uniform(bound)
    return (nnx.Param(init(rngs.params(), (layers, tokens, rank))),
            nnx.Param(init(rngs.params(), (layers, rank, width))))


def full_tokens(layers: int, tokens: int, width: int, *, patch_size: int,
                rngs: nnx.Rngs) -> nnx.Param:
    """`Reins` tokens [L, m, c], U(+-sqrt(6 / (3 p^2 + c)))."""
    bound = math.sqrt(6.0 / (3 * patch_size**2 + width))
    return nnx.Param(_uniform(bound)(rngs.params(), (layers, tokens, width)))


def at_layer(param: nnx.Param, layer_index) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(param[...], layer_index, axis=0, keepdims=False)


def token_logits(f: jax.Array, tokens: jax.Array) -> jax.Array:
    """f T^T [B, N, m] in float32 (unscaled: SET's and FADA's instance norm comes first)."""
    return jnp.einsum("bnc,mc->bnm", f, tokens.astype(f.dtype)).astype(jnp.float32)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """F.instance_norm of [N, B, m] (no running statistics, no affine): per (token, sample) over
    the last axis, biased variance."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def refine(f: jax.Array, logits: jax.Array, tokens: jax.Array, token2feat: nnx.Linear,
           delta_f: nnx.Linear) -> jax.Array:
    """Linear_delta(softmax(logits)[..., 1:] token2feat(T[1:]) + f): the token adjustment of f."""
    attn = jax.nn.softmax(logits, axis=-1)[..., 1:].astype(f.dtype)
    values = token2feat(tokens[1:].astype(f.dtype))
    return delta_f(jnp.einsum("bnm,mc->bnc", attn, values) + f)


class TokenAdapter(nnx.Module):
    """The parts every REIN-family adapter has: `scale` and the query layers.

    Subclasses hold their token sets and define `__call__(layer_index, f_v, f_d, *, train,
    rng)` (docs/design.md, "The adapter contract") and `query_tokens()` [L, m, c].
    """

    def _shared(self, config: AdapterConfig, query_width: int, rngs: nnx.Rngs) -> None:
        self.config = config
        self.scale = nnx.Param(jnp.asarray(config.scale_init, jnp.float32))
        if config.link_token_to_query:
            self.transform = _torch_linear(query_width, config.query_dim, jnp.float32, rngs)
            self.merge = _torch_linear(3 * config.query_dim, config.query_dim, jnp.float32, rngs)

    def _rein_set(self, rngs: nnx.Rngs) -> None:
        """REIN's low-rank token set at the ViT width and its two linears, by the released
        names: learnable_tokens_a / _b, mlp_token2feat, mlp_delta_f."""
        c = self.config
        self.learnable_tokens_a, self.learnable_tokens_b = lora_tokens(
            c.num_layers, c.num_tokens, c.rank, c.width, patch_size=c.patch_size,
            bound_width=c.width, rngs=rngs)
        self.mlp_token2feat, self.mlp_delta_f = self.linears(c.width, rngs)

    def linears(self, width: int, rngs: nnx.Rngs) -> tuple[nnx.Linear, nnx.Linear]:
        """mlp_token2feat and mlp_delta_f (c -> c): kaiming_uniform(a=sqrt 5) weights and
        PyTorch's default biases, i.e. both U(+-1/sqrt(c))."""
        dtype = self.config.dtype
        return _torch_linear(width, width, dtype, rngs), _torch_linear(width, width, dtype, rngs)

    def refined(self, f_v: jax.Array, delta: jax.Array) -> jax.Array:
        return f_v + (self.scale[...] * delta).astype(f_v.dtype)

    def query_tokens(self) -> jax.Array:
        raise NotImplementedError

    def query_embedding(self) -> jax.Array | None:
        if not self.config.link_token_to_query:
            return None
        return linked_queries(self.query_tokens(), self.transform, self.merge)


def check_features(name: str, f_v: jax.Array, width: int) -> None:
    if f_v.ndim != 3 or f_v.shape[-1] != width:
        raise ValueError(f"{name}: patch tokens have shape {f_v.shape}, expected [B, N, {width}]")
