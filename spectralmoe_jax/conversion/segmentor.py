"""Released SpectralMoE / REIN (and SET / FADA / DepthForge, conversion/methods.py) MMSegmentation
checkpoints -> the segmentor's parts.

A released `state_dict` keeps the trained parts only (the backbone's `state_dict` override drops
the frozen weights): the adapter (`backbone.depthmoe.*` or `backbone.reins.*`) and the
Mask2Former head (`decode_head.*`). Other files hold one part (a bare `depthmoe.*` adapter, a
`decode_head.*` head) or everything, the frozen backbones too (`backbone.*` DINOv3 / DINOv2 /
DOFA keys, and PromptDA under `backbone.depth_anything.*`). `checkpoint_parts` tells which.
"""

from __future__ import annotations

import re

import numpy as np

from spectralmoe_jax.conversion.adapter import PREFIXES, convert_adapter
from spectralmoe_jax.conversion.mask2former import HF_PREFIXES, convert_hf, convert_mmseg, detect_naming
from spectralmoe_jax.conversion.methods import (PREFIXES as METHOD_PREFIXES,
                                                convert_method_adapter, split_query_correction)
from spectralmoe_jax.conversion.rules import ConversionError, param_shapes

PARTS = ("adapter", "head", "vfm", "depth")
TRAINED = ("adapter", "head")
VFM_PREFIX = "backbone."
DEPTH_PREFIX = "backbone.depth_anything."  # PromptDA inside the released backbone wrappers
_ADAPTER = re.compile("|".join({*PREFIXES.values(), *METHOD_PREFIXES.values()}))


def _is_vfm_key(key: str) -> bool:
    return key.startswith(VFM_PREFIX) and not key.startswith(DEPTH_PREFIX) and not _ADAPTER.match(key)


def checkpoint_parts(state_dict) -> tuple[str, ...]:
    """Which of the segmentor's parts a released-style state dict holds, in `PARTS` order."""
    keys = list(state_dict)
    found = {
        "adapter": any(_ADAPTER.match(k) for k in keys),
        "head": any(k.startswith(("decode_head.", *HF_PREFIXES)) for k in keys),
        "vfm": any(_is_vfm_key(k) for k in keys),
        "depth": any(k.startswith(DEPTH_PREFIX + "pretrained.") for k in keys),
    }
    return tuple(part for part in PARTS if found[part])


def backbone_state(state_dict, part: str) -> dict[str, np.ndarray]:
    """The frozen VFM's (`backbone.*` less the adapter and PromptDA) or the depth encoder's
    (`backbone.depth_anything.*`: PromptDA's own `pretrained.*` / `depth_head.*` naming) keys."""
    if part == "vfm":
        return {k[len(VFM_PREFIX):]: v for k, v in state_dict.items() if _is_vfm_key(k)}
    return {k[len(DEPTH_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DEPTH_PREFIX)}


def convert_trained_parts(state_dict, model, parts: tuple[str, ...] | None = None
                          ) -> dict[str, np.ndarray]:
    """{'adapter/...': array, 'head/...': array} for the trained parts the state dict holds (or
    `parts`). Every problem of every part is named in one `ConversionError`."""
    parts = tuple(p for p in checkpoint_parts(state_dict) if p in TRAINED) if parts is None else parts
    if not parts:
        raise ConversionError(
            "no adapter or head in the checkpoint (backbone.depthmoe.*, backbone.reins.*, "
            f"backbone.depthforge.*, decode_head.*); first keys: {', '.join(list(state_dict)[:5])}")
    params, errors = {}, []
    for part in parts:
        module = getattr(model, part)
        if module is None:
            errors.append(f"{part}: the checkpoint holds one but the config builds none "
                          f"(model.{part}.enabled)")
            continue
        try:
            if part == "adapter":
                kind = module.config.kind
                convert = convert_adapter if kind in PREFIXES else convert_method_adapter
                converted = convert(state_dict, module.config)
            else:
                head_state, expected, converted = state_dict, param_shapes(module), {}
                if module.config.query_correction:  # DepthForge's head: its DQCM beside it
                    head_state, converted = split_query_correction(state_dict)
                    expected = {k: v for k, v in expected.items()
                                if not k.startswith("query_correction/")}
                convert = convert_hf if detect_naming(head_state) == "hf" else convert_mmseg
                converted = {**converted, **convert(head_state, expected=expected)}
        except ConversionError as error:
            errors.append(f"{part}: {error}")
            continue
        params.update({f"{part}/{k}": v for k, v in converted.items()})
    if errors:
        raise ConversionError(" || ".join(errors))
    return params

