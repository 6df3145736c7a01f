"""Trained SpectralMoE / REIN models: the adapter and the Mask2Former head of a released
MMSegmentation checkpoint (`backbone.depthmoe.*` or `backbone.reins.*`, and `decode_head.*`).

The released `state_dict` keeps only these trained parts (the frozen backbones come from their
own files), so a released model is: VFM file + depth file + this checkpoint.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from spectralmoe_jax.conversion.adapter import convert_adapter
from spectralmoe_jax.conversion.mask2former import convert_hf, convert_mmseg, detect_naming
from spectralmoe_jax.conversion.methods import convert_method_adapter, split_query_correction


def convert_trained_parts(state_dict, model) -> dict[str, np.ndarray]:
    """{'adapter/...': array, 'head/...': array} for `model`'s trainable modules (SET, FADA and
    DepthForge checkpoints by `conversion/methods.py`)."""
    params = {}
    if model.adapter is not None:
        config = model.adapter.config
        convert = convert_adapter if config.kind in ("spectral_moe", "rein") else convert_method_adapter
        params.update({f"adapter/{k}": v for k, v in convert(state_dict, config).items()})
    if model.head.config.query_correction:  # DepthForge's head
        state_dict, correction = split_query_correction(state_dict)
        params.update({f"head/{k}": v for k, v in correction.items()})
    head = convert_hf if detect_naming(state_dict) == "hf" else convert_mmseg
    params.update({f"head/{k}": v for k, v in head(state_dict).items()})
    return params


class TrainedParts(nnx.Module):
    """The segmentor's trained parts under their own names (`adapter/...`, `head/...`)."""

    def __init__(self, model):
        self.adapter = nnx.data(model.adapter)
        self.head = model.head
