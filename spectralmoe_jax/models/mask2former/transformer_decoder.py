"""Masked-attention transformer decoder with per-layer predictions (Mask2Former; mmdet
`Mask2FormerHead.forward` / `Mask2FormerTransformerDecoderLayer`, HF
`Mask2FormerTransformerModule`).

Layer i attends to level i mod 3 of the pixel decoder's multi-scale features (coarsest first),
restricted to where the previous prediction, resized to that level, has sigmoid >= 0.5. The
layers run as a `lax.scan` over rounds of one layer per level.
"""

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.attention import dot_product_attention
from spectralmoe_jax.models.mask2former import initializers
from spectralmoe_jax.models.mask2former.config import Mask2FormerConfig
from spectralmoe_jax.models.mask2former.layers import FFN, layer_norm, linear, resize_bilinear
from spectralmoe_jax.models.mask2former.position_encoding import sine_position_encoding
from spectralmoe_jax.models.stacking import stacked


class MultiHeadAttention(nnx.Module):
    """Scaled dot-product attention with separate q/k/v/out projections (nn.MultiheadAttention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        implementation: str | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.implementation = implementation
        projection = functools.partial(
            linear, dim, dim, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )
        # mmdet applies xavier-normal to the fused [3D, D] in_proj: variance 2 / (D + 3D) per part.
        qkv_init = nnx.initializers.variance_scaling(0.5, "fan_avg", "normal")
        self.q_proj = projection(kernel_init=qkv_init)
        self.k_proj = projection(kernel_init=qkv_init)
        self.v_proj = projection(kernel_init=qkv_init)
        self.out_proj = projection(kernel_init=initializers.xavier_normal)

    def __call__(self, query, key, value, mask=None):
        """query [B, T, D], key/value [B, S, D], mask bool broadcastable to [B, M, T, S] (True
        attends) -> [B, T, D]."""

        def heads(x):
            return x.reshape(*x.shape[:2], self.num_heads, -1)

        out = dot_product_attention(
            heads(self.q_proj(query)),
            heads(self.k_proj(key)),
            heads(self.v_proj(value)),
            mask=mask,
            implementation=self.implementation,
        )
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class MaskedAttentionDecoderLayer(nnx.Module):
    """Post-norm: masked cross-attention -> self-attention -> FFN, each followed by LayerNorm."""

    def __init__(self, config: Mask2FormerConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.dtype
        attention = functools.partial(
            MultiHeadAttention, implementation=c.attention_implementation, dtype=dt, rngs=rngs
        )
        self.cross_attn = attention(c.hidden_dim, c.decoder_heads)
        self.cross_norm = layer_norm(c.hidden_dim, dtype=dt, rngs=rngs)
        self.self_attn = attention(c.hidden_dim, c.decoder_heads)
        self.self_norm = layer_norm(c.hidden_dim, dtype=dt, rngs=rngs)
        self.ffn = FFN(c.hidden_dim, c.decoder_ffn_dim, dtype=dt, rngs=rngs)
        self.ffn_norm = layer_norm(c.hidden_dim, dtype=dt, rngs=rngs)

    def __call__(self, x, query_pos, memory, memory_pos, mask):
        x = self.cross_norm(x + self.cross_attn(x + query_pos, memory + memory_pos, memory, mask))
        q = x + query_pos
        x = self.self_norm(x + self.self_attn(q, q, x))
        return self.ffn_norm(x + self.ffn(x))


def attention_mask(mask_logits, size: tuple[int, int]):
    """Where each query may attend: [B, Q, H, W] logits -> bool [B, 1, Q, h * w] (True attends).

    Bilinear resize to the level, keep sigmoid >= 0.5; a query whose mask is empty everywhere
    attends everywhere (the released rule, also HF's). No gradient flows through the mask.
    """
    batch, queries = mask_logits.shape[:2]
    logits = resize_bilinear(jax.lax.stop_gradient(mask_logits), (batch, queries, *size))
    keep = ~(jax.nn.sigmoid(logits.reshape(batch, queries, -1)) < 0.5)
    keep = keep | ~jnp.any(keep, axis=-1, keepdims=True)
    return keep[:, None]


class MaskedAttentionDecoder(nnx.Module):
    """Queries -> class and mask logits before the first layer and after each layer."""

    def __init__(self, config: Mask2FormerConfig, *, rngs: nnx.Rngs):
        c, d, dt = config, config.hidden_dim, config.dtype
        self.config = config
        if c.replace_query_feat:
            self.query_feat_proj = linear(d, d, dtype=dt, rngs=rngs)
        else:
            self.query_feat = nnx.Param(initializers.embedding(rngs.params(), (c.num_queries, d)))
        if c.learn_query_position:
            self.query_pos = nnx.Param(initializers.embedding(rngs.params(), (c.num_queries, d)))
        self.level_embed = nnx.Param(
            initializers.embedding(rngs.params(), (c.num_feature_levels, d))
        )
        # Every parameter has a leading [decoder_layers] axis, layer i at index i (checkpoint
        # order); `__call__` views it as [rounds, levels] to scan over rounds.
        self.layers = stacked(lambda rngs: MaskedAttentionDecoderLayer(c, rngs=rngs),
                              c.decoder_layers, rngs)
        self.norm = layer_norm(d, dtype=dt, rngs=rngs)
        self.class_head = linear(d, c.num_classes + 1, dtype=dt, rngs=rngs)
        self.mask_mlp = nnx.List([linear(d, d, dtype=dt, rngs=rngs) for _ in range(3)])

    def _query_position(self, query_embedding, batch: int):
        c = self.config
        if query_embedding is None:
            if not c.learn_query_position:
                raise ValueError(
                    "learn_query_position=False: pass query_embedding [Q, D] or [B, Q, D]"
                )
            query_embedding = self.query_pos[...]
        expected = (c.num_queries, c.hidden_dim)
        if tuple(query_embedding.shape[-2:]) != expected or query_embedding.ndim not in (2, 3):
            raise ValueError(
                f"query_embedding must be {expected} or (B, *{expected}), "
                f"got {tuple(query_embedding.shape)}"
            )
        return jnp.broadcast_to(query_embedding, (batch, *expected)).astype(c.dtype)

    def predict(self, x, mask_features):
        """Decoder state [B, Q, D] -> class logits [B, Q, K + 1], mask logits [B, Q, H, W]."""
        x = self.norm(x)
        embedding = x
        for i, layer in enumerate(self.mask_mlp):
            embedding = layer(embedding)
            if i < len(self.mask_mlp) - 1:
                embedding = jax.nn.relu(embedding)
        return self.class_head(x), jnp.einsum("bqc,bhwc->bqhw", embedding, mask_features)

    def __call__(self, multi_scale: Sequence[jax.Array], mask_features, query_embedding=None):
        """multi_scale: NHWC maps, coarsest first; mask_features [B, H, W, D] ->
        class logits [L + 1, B, Q, K + 1], mask logits [L + 1, B, Q, H, W]."""
        c = self.config
        if len(multi_scale) != c.num_feature_levels:
            raise ValueError(
                f"expected {c.num_feature_levels} multi-scale maps, got {len(multi_scale)}"
            )
        batch = mask_features.shape[0]
        sizes = [tuple(f.shape[1:3]) for f in multi_scale]
        memory = [
            f.reshape(batch, -1, c.hidden_dim) + self.level_embed[i].astype(f.dtype)
            for i, f in enumerate(multi_scale)
        ]
        memory_pos = [
            sine_position_encoding(h, w, c.hidden_dim // 2).reshape(1, h * w, -1).astype(c.dtype)
            for h, w in sizes
        ]
        query_pos = self._query_position(query_embedding, batch)
        if c.replace_query_feat:
            x = self.query_feat_proj(query_pos)
        else:
            x = jnp.broadcast_to(self.query_feat[...], query_pos.shape).astype(c.dtype)

        class_logits, mask_logits = self.predict(x, mask_features)
        levels = c.num_feature_levels
        graphdef, layer_state = nnx.split(self.layers)

        def round_(carry, round_state):
            """Layers for levels 0, 1, ... in turn (as many as `round_state` holds)."""
            x, mask_logits = carry
            classes, masks = [], []
            for level in range(jax.tree.leaves(round_state)[0].shape[0]):
                layer = nnx.merge(graphdef, jax.tree.map(operator.itemgetter(level), round_state))
                mask = attention_mask(mask_logits, sizes[level])
                x = layer(x, query_pos, memory[level], memory_pos[level], mask)
                class_logits, mask_logits = self.predict(x, mask_features)
                classes.append(class_logits)
                masks.append(mask_logits)
            return (x, mask_logits), (jnp.stack(classes), jnp.stack(masks))

        # Layer i is round i // levels at level i % levels. The levels' memories differ in length,
        # so the scanned unit is a round: one layer per level, the levels unrolled. Layers past
        # the last full round (decoder_layers not a multiple of the levels) run after the scan.
        full = c.decoder_layers - c.decoder_layers % levels
        rounds = jax.tree.map(lambda a: a[:full].reshape(-1, levels, *a.shape[1:]), layer_state)
        # Each round is recomputed in the backward (under 1% of the step's FLOPs): the scan then
        # keeps only its carry per round instead of about 180 stacked residuals, each
        # zero-filled, written and read back (copies in the GPU program, issue 20).
        carry, (classes, masks) = jax.lax.scan(jax.checkpoint(round_), (x, mask_logits), rounds)
        classes, masks = classes.reshape(-1, *classes.shape[2:]), masks.reshape(-1, *masks.shape[2:])
        if full < c.decoder_layers:
            _, (last_classes, last_masks) = round_(carry, jax.tree.map(lambda a: a[full:],
                                                                       layer_state))
            classes = jnp.concatenate([classes, last_classes])
            masks = jnp.concatenate([masks, last_masks])
        # The prediction before the first layer, then one after each layer: [L + 1, ...].
        classes = jnp.concatenate([class_logits[None], classes])
        masks = jnp.concatenate([mask_logits[None], masks])
        return classes, masks
