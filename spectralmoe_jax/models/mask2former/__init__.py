"""Mask2Former decoder: deformable-attention pixel decoder, masked-attention transformer decoder."""

from spectralmoe_jax.models.mask2former.config import Mask2FormerConfig
from spectralmoe_jax.models.mask2former.head import Mask2FormerHead, semantic_inference

__all__ = ["Mask2FormerConfig", "Mask2FormerHead", "semantic_inference"]
