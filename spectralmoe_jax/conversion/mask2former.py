"""Mask2Former decoder checkpoints -> `Mask2FormerHead` parameters.

Two namings, as tables of rules:
- HF transformers `Mask2FormerForUniversalSegmentation` (`model.pixel_level_module.decoder.*`,
  `model.transformer_module.*`, `class_predictor.*`; the backbone is not converted here);
- mmdet / MMSegmentation, the released SpectralMoE and REIN checkpoints (`decode_head.*`: mmdet
  `MSDeformAttnPixelDecoder`, `Mask2FormerTransformerDecoder` with mmcv attention and FFN).

Fused `nn.MultiheadAttention` projections (`in_proj_weight` [3D, D], `in_proj_bias` [3D]) are
split into q/k/v before the tables apply, so every rule maps one tensor to one parameter.
Keys outside the decoder's prefixes are left to the backbone / adapter converters.
"""

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from spectralmoe_jax.conversion.rules import (
    ConversionError,
    Problems,
    Rule,
    apply_rules,
    check_params,
    conv_kernel,
    linear_kernel,
    load_into_module,
    param_shapes,
)


def _linear(source: str, target: str) -> list[Rule]:
    return [
        Rule(source + r"\.weight", target + "/kernel", linear_kernel),
        Rule(source + r"\.bias", target + "/bias"),
    ]


def _conv(source: str, target: str) -> list[Rule]:
    return [
        Rule(source + r"\.weight", target + "/kernel", conv_kernel),
        Rule(source + r"\.bias", target + "/bias"),
    ]


def _norm(source: str, target: str) -> list[Rule]:
    return [
        Rule(source + r"\.weight", target + "/scale"),
        Rule(source + r"\.bias", target + "/bias"),
    ]


def _stacked(*groups: list[Rule]) -> list[Rule]:
    """Rules of the scanned encoder / decoder layers: the source's layer index (regex group 1)
    picks the row of the parameter's leading [layers] axis, in checkpoint order."""
    return [dataclasses.replace(r, target=r.target + "[{layer}]") for g in groups for r in g]


_ENC = "pixel_decoder/encoder_layers"
_DEC = "transformer_decoder/layers"
_DEFORM = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"

# --- HF transformers ------------------------------------------------------------------------
_PD = r"model\.pixel_level_module\.decoder\."
_TM = r"model\.transformer_module\."
HF_PREFIXES = ("model.pixel_level_module.decoder.", "model.transformer_module.", "class_predictor.")
HF_RULES = [
    Rule(_PD + r"level_embed", "pixel_decoder/level_embed"),
    *_conv(_PD + r"input_projections\.(\d+)\.0", r"pixel_decoder/input_projs/\1/conv"),
    *_norm(_PD + r"input_projections\.(\d+)\.1", r"pixel_decoder/input_projs/\1/norm"),
    *_stacked(
        _linear(_PD + r"encoder\.layers\.(\d+)\.self_attn\." + _DEFORM, _ENC + r"/attn/\2"),
        _norm(_PD + r"encoder\.layers\.(\d+)\.self_attn_layer_norm", _ENC + "/attn_norm"),
        _linear(_PD + r"encoder\.layers\.(\d+)\.(fc1|fc2)", _ENC + r"/ffn/\2"),
        _norm(_PD + r"encoder\.layers\.(\d+)\.final_layer_norm", _ENC + "/ffn_norm"),
    ),
    # adapter_{i+1} / layer_{i+1} belong to input level i; HF numbers them from 1.
    *[
        rule
        for i in range(3)
        for rule in (
            _conv(_PD + rf"adapter_{i + 1}\.0", f"pixel_decoder/lateral_convs/{i}/conv")
            + _norm(_PD + rf"adapter_{i + 1}\.1", f"pixel_decoder/lateral_convs/{i}/norm")
            + _conv(_PD + rf"layer_{i + 1}\.0", f"pixel_decoder/output_convs/{i}/conv")
            + _norm(_PD + rf"layer_{i + 1}\.1", f"pixel_decoder/output_convs/{i}/norm")
        )
    ],
    *_conv(_PD + r"mask_projection", "pixel_decoder/mask_proj"),
    Rule(_TM + r"queries_embedder\.weight", "transformer_decoder/query_pos"),
    Rule(_TM + r"queries_features\.weight", "transformer_decoder/query_feat"),
    Rule(_TM + r"level_embed\.weight", "transformer_decoder/level_embed"),
    *_stacked(
        _linear(
            _TM + r"decoder\.layers\.(\d+)\.(self_attn|cross_attn)\." + _PROJ, _DEC + r"/\2/\3"
        ),
        _norm(_TM + r"decoder\.layers\.(\d+)\.cross_attn_layer_norm", _DEC + "/cross_norm"),
        _norm(_TM + r"decoder\.layers\.(\d+)\.self_attn_layer_norm", _DEC + "/self_norm"),
        _linear(_TM + r"decoder\.layers\.(\d+)\.(fc1|fc2)", _DEC + r"/ffn/\2"),
        _norm(_TM + r"decoder\.layers\.(\d+)\.final_layer_norm", _DEC + "/ffn_norm"),
    ),
    *_norm(_TM + r"decoder\.layernorm", "transformer_decoder/norm"),
    *_linear(
        _TM + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0", r"transformer_decoder/mask_mlp/\1"
    ),
    *_linear(r"class_predictor", "transformer_decoder/class_head"),
]

# --- mmdet / MMSegmentation (relative to the head's prefix, "decode_head.") ------------------
_P = r"pixel_decoder\."
_T = r"transformer_decoder\."
MMSEG_RULES = [
    *_conv(_P + r"input_convs\.(\d+)\.conv", r"pixel_decoder/input_projs/\1/conv"),
    *_norm(_P + r"input_convs\.(\d+)\.gn", r"pixel_decoder/input_projs/\1/norm"),
    Rule(_P + r"level_encoding\.weight", "pixel_decoder/level_embed"),
    *_stacked(
        _linear(_P + r"encoder\.layers\.(\d+)\.self_attn\." + _DEFORM, _ENC + r"/attn/\2"),
        _linear(_P + r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0", _ENC + "/ffn/fc1"),
        _linear(_P + r"encoder\.layers\.(\d+)\.ffn\.layers\.1", _ENC + "/ffn/fc2"),
        _norm(_P + r"encoder\.layers\.(\d+)\.norms\.0", _ENC + "/attn_norm"),
        _norm(_P + r"encoder\.layers\.(\d+)\.norms\.1", _ENC + "/ffn_norm"),
    ),
    # mmdet's forward applies lateral_convs[i] / output_convs[i] to input level i.
    *_conv(_P + r"lateral_convs\.(\d+)\.conv", r"pixel_decoder/lateral_convs/\1/conv"),
    *_norm(_P + r"lateral_convs\.(\d+)\.gn", r"pixel_decoder/lateral_convs/\1/norm"),
    *_conv(_P + r"output_convs\.(\d+)\.conv", r"pixel_decoder/output_convs/\1/conv"),
    *_norm(_P + r"output_convs\.(\d+)\.gn", r"pixel_decoder/output_convs/\1/norm"),
    *_conv(_P + r"mask_feature", "pixel_decoder/mask_proj"),
    *_stacked(
        _linear(_T + r"layers\.(\d+)\.(self_attn|cross_attn)\.attn\." + _PROJ, _DEC + r"/\2/\3"),
        _linear(_T + r"layers\.(\d+)\.ffn\.layers\.0\.0", _DEC + "/ffn/fc1"),
        _linear(_T + r"layers\.(\d+)\.ffn\.layers\.1", _DEC + "/ffn/fc2"),
        _norm(_T + r"layers\.(\d+)\.norms\.0", _DEC + "/cross_norm"),
        _norm(_T + r"layers\.(\d+)\.norms\.1", _DEC + "/self_norm"),
        _norm(_T + r"layers\.(\d+)\.norms\.2", _DEC + "/ffn_norm"),
    ),
    *_norm(_T + r"post_norm", "transformer_decoder/norm"),
    Rule(r"query_embed\.weight", "transformer_decoder/query_pos"),
    Rule(r"query_feat\.weight", "transformer_decoder/query_feat"),
    *_linear(r"querys2feat", "transformer_decoder/query_feat_proj"),
    Rule(r"level_embed\.weight", "transformer_decoder/level_embed"),
    *_linear(r"cls_embed", "transformer_decoder/class_head"),
    # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)
    *_linear(r"mask_embed\.0", "transformer_decoder/mask_mlp/0"),
    *_linear(r"mask_embed\.2", "transformer_decoder/mask_mlp/1"),
    *_linear(r"mask_embed\.4", "transformer_decoder/mask_mlp/2"),
]


def split_in_proj(state_dict: Mapping[str, np.ndarray], problems: Problems) -> dict[str, np.ndarray]:
    """`X.in_proj_weight` / `X.in_proj_bias` -> `X.{q,k,v}_proj.weight` / `.bias`."""
    out = {}
    for key, value in state_dict.items():
        for fused, kind in ((".in_proj_weight", "weight"), (".in_proj_bias", "bias")):
            if key.endswith(fused):
                value = np.asarray(value)
                if value.shape[0] % 3:
                    problems.mis_shaped.append(
                        f"{key}: shape {value.shape} is not 3 stacked projections")
                    break
                base = key[: -len(fused)]
                for name, part in zip(("q", "k", "v"), np.split(value, 3, axis=0)):
                    out[f"{base}.{name}_proj.{kind}"] = part
                break
        else:
            out[key] = value
    return out


def _convert(selected, rules, expected) -> dict[str, np.ndarray]:
    """The table applied; with the head's {path: shape}, every problem in one error."""
    problems = Problems()
    params = apply_rules(split_in_proj(selected, problems), rules, expected=expected,
                         problems=problems)
    if expected is None:
        problems.raise_if_any()
    else:
        check_params(params, expected, problems=problems)
    return params


def convert_hf(state_dict: Mapping[str, np.ndarray], *, expected=None) -> dict[str, np.ndarray]:
    """HF `Mask2FormerForUniversalSegmentation` state dict -> {head parameter path: array}.

    `expected`: the head's {path: shape} (`rules.param_shapes`), to check it all at once.
    """
    selected = {k: v for k, v in state_dict.items() if k.startswith(HF_PREFIXES)}
    if not selected:
        raise ConversionError(
            f"no HF Mask2Former decoder keys (prefixes {HF_PREFIXES}) in the checkpoint"
        )
    return _convert(selected, HF_RULES, expected)


def convert_mmseg(
    state_dict: Mapping[str, np.ndarray], prefix: str = "decode_head.", *, expected=None
) -> dict[str, np.ndarray]:
    """mmdet / MMSegmentation `Mask2FormerHead` state dict (keys under `prefix`) -> parameters."""
    selected = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise ConversionError(f"no keys under {prefix!r} in the checkpoint")
    rules = [dataclasses.replace(r, source=re.escape(prefix) + r.source) for r in MMSEG_RULES]
    return _convert(selected, rules, expected)


def detect_naming(state_dict: Mapping[str, np.ndarray]) -> str:
    """'hf' or 'mmseg', from the keys."""
    if any(k.startswith(HF_PREFIXES) for k in state_dict):
        return "hf"
    if any(k.startswith("decode_head.") for k in state_dict):
        return "mmseg"
    raise ConversionError(
        "checkpoint has neither HF Mask2Former keys (model.pixel_level_module.decoder.*, "
        "model.transformer_module.*) nor mmseg keys (decode_head.*)"
    )


def load_head(head, state_dict: Mapping[str, np.ndarray], naming: str = "auto") -> None:
    """Converts `state_dict` and writes it into a `Mask2FormerHead` in place.

    A released SpectralMoE / REIN head has no `query_embed` (the adapter supplies it): build the
    head with `learn_query_position=False` (and `replace_query_feat=True` for REIN's
    `querys2feat`); a mismatch is reported by parameter name.
    """
    naming = detect_naming(state_dict) if naming == "auto" else naming
    converters = {"hf": convert_hf, "mmseg": convert_mmseg}
    if naming not in converters:
        raise ValueError(f"naming must be 'auto', 'hf' or 'mmseg', got {naming!r}")
    load_into_module(head, converters[naming](state_dict, expected=param_shapes(head)))
