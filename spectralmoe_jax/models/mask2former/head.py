"""The Mask2Former head: pixel decoder + masked-attention decoder (docs/design.md contract), and
semantic inference."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.mask2former.config import Mask2FormerConfig
from spectralmoe_jax.models.mask2former.pixel_decoder import PixelDecoder
from spectralmoe_jax.models.mask2former.query_correction import QueryCorrection
from spectralmoe_jax.models.mask2former.transformer_decoder import MaskedAttentionDecoder


class Mask2FormerHead(nnx.Module):
    """features: NHWC maps at strides 4, 8, 16, 32 -> {"class_logits": [L + 1, B, Q, K + 1],
    "mask_logits": [L + 1, B, Q, H/4, W/4]}, in `config.dtype`.

    `query_embedding` ([Q, D] or [B, Q, D]), when given, replaces the learned query position
    embedding: the released head's link to the adapter's expert tokens.
    """

    def __init__(self, config: Mask2FormerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.query_correction = nnx.data(
            QueryCorrection(config.in_channels[0], len(config.in_channels), dtype=config.dtype,
                            rngs=rngs) if config.query_correction else None)
        self.pixel_decoder = PixelDecoder(config, rngs=rngs)
        self.transformer_decoder = MaskedAttentionDecoder(config, rngs=rngs)

    def __call__(self, features: Sequence[jax.Array], query_embedding=None):
        if self.query_correction is not None:
            features = [features[0] + self.query_correction(features).astype(features[0].dtype),
                        *features[1:]]
        mask_features, multi_scale = self.pixel_decoder(features)
        class_logits, mask_logits = self.transformer_decoder(
            multi_scale, mask_features, query_embedding
        )
        return {"class_logits": class_logits, "mask_logits": mask_logits}


def semantic_inference(class_logits, mask_logits):
    """[B, Q, K + 1], [B, Q, h, w] -> [B, h, w, K]: sum over queries of softmax(class) without the
    no-object column, times sigmoid(mask). Scores are non-negative; per pixel their sum over classes
    is sum_q (1 - p_q(no object)) sigmoid(m_q), within [0, Q]. (The released `predict` first
    upsamples the mask logits to the image; that belongs to the caller.)"""
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
    masks = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    return jnp.einsum("bqk,bqhw->bhwk", probs, masks)
