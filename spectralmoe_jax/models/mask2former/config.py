"""Configuration of the Mask2Former decoder (SPEC 1.3, the released `DepthMoEMask2FormerHead`)."""

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig:
    """Defaults reproduce the released head on a ViT-L: 4 input levels at strides 4, 8, 16, 32.

    One width `hidden_dim` serves the pixel decoder, the mask features and the transformer decoder
    (mmdet `feat_channels == out_channels`, HF `feature_size == mask_feature_size == hidden_dim`),
    so the decoder needs no input projections.
    """

    in_channels: tuple[int, ...] = (1024, 1024, 1024, 1024)  # widths of the 4 input maps
    num_classes: int = 24  # K; the class head has K + 1 outputs (the last is "no object")
    hidden_dim: int = 256  # width of pixel decoder, mask features and transformer decoder
    num_queries: int = 100  # object queries
    num_feature_levels: int = 3  # coarsest levels refined by the encoder and cycled by the decoder
    encoder_layers: int = 6  # deformable-attention layers of the pixel decoder
    encoder_heads: int = 8  # attention heads of the pixel decoder layers
    encoder_points: int = 4  # sampling points per head and level
    encoder_ffn_dim: int = 1024  # feed-forward width of the pixel decoder layers
    decoder_layers: int = 9  # masked-attention layers of the transformer decoder
    decoder_heads: int = 8  # attention heads of the transformer decoder layers
    decoder_ffn_dim: int = 2048  # feed-forward width of the transformer decoder layers
    num_groups: int = 32  # GroupNorm groups of the pixel decoder's convolutions
    # A learned query position embedding; the released head deletes it and takes the adapter's.
    learn_query_position: bool = True
    # REIN / released option `replace_query_feat`: query features = Linear(query position
    # embedding) instead of a learned table.
    replace_query_feat: bool = False
    # DepthForge's released head: its Dynamic Query Correction Module adds a gated fusion of
    # all levels to the stride-4 map before the pixel decoder (`query_correction.py`).
    query_correction: bool = False
    # Decoder attention kernel, `models.attention`: None / "xla", "cudnn" or "auto" (cuDNN flash
    # attention for bf16 on a GPU, XLA elsewhere). On an H100 cuDNN halves the train step's
    # transposes: XLA's batched matmuls over (batch, heads) need heads-major copies of every
    # operand and gradient (docs/benchmarks.md, issue 20).
    attention_implementation: str | None = "auto"
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def __post_init__(self):
        d = self.hidden_dim
        if d % self.num_groups:
            raise ValueError(f"hidden_dim {d} is not divisible by num_groups {self.num_groups}")
        if d % 2:
            raise ValueError(f"hidden_dim {d} must be even (half of it for each sine axis)")
        for name in ("encoder_heads", "decoder_heads"):
            if d % getattr(self, name):
                raise ValueError(f"hidden_dim {d} is not divisible by {name} {getattr(self, name)}")
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if len(self.in_channels) <= self.num_feature_levels:
            raise ValueError(
                f"in_channels {self.in_channels} must hold more levels than num_feature_levels "
                f"{self.num_feature_levels} (the finest ones build the mask features)"
            )
