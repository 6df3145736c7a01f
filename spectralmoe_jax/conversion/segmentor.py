"""Trained SpectralMoE / REIN models: the adapter and the Mask2Former head of a released
MMSegmentation checkpoint (`backbone.depthmoe.*` or `backbone.reins.*`, and `decode_head.*`).

The released `state_dict` keeps only these trained parts (the frozen backbones come from their
own files), so a released model is: VFM file + depth file + this checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from spectralmoe_jax.conversion.adapter import convert_adapter
from spectralmoe_jax.conversion.mask2former import convert_hf, convert_mmseg, detect_naming
from spectralmoe_jax.conversion.rules import ConversionError, flatten_state, load_into_module
from spectralmoe_jax.conversion.torch_io import load_state_dict


def convert_trained_parts(state_dict, model) -> dict[str, np.ndarray]:
    """{'adapter/...': array, 'head/...': array} for `model`'s trainable modules."""
    params = {}
    if model.adapter is not None:
        params.update({f"adapter/{k}": v for k, v in
                       convert_adapter(state_dict, model.adapter.config).items()})
    head = convert_hf if detect_naming(state_dict) == "hf" else convert_mmseg
    params.update({f"head/{k}": v for k, v in head(state_dict).items()})
    return params


def load_trained_parts(model, path: str) -> None:
    """Fills the adapter and head of `model` from a released `.pth` or our Orbax directory."""
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(os.path.abspath(path))
        params = {k: np.asarray(v) for k, v in flatten_state(restored).items()}
    else:
        params = convert_trained_parts(load_state_dict(path), model)
    try:  # names and shapes are checked over exactly the trained parts
        load_into_module(TrainedParts(model), params)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from error


class TrainedParts(nnx.Module):
    """The segmentor's trained parts under their own names (`adapter/...`, `head/...`)."""

    def __init__(self, model):
        self.adapter = nnx.data(model.adapter)
        self.head = model.head


def save_trained_parts(model, directory: str) -> None:
    import orbax.checkpoint as ocp

    pure = nnx.to_pure_dict(nnx.state(TrainedParts(model), nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), pure, force=True)
