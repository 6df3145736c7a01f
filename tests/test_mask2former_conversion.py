"""Conversion of Mask2Former decoder checkpoints: HF naming and the mmdet / MMSegmentation naming
of the released checkpoints give the same parameters; mismatches are reported by name."""

import re

import numpy as np
import pytest
from flax import nnx

from spectralmoe_jax.conversion.mask2former import convert_hf, convert_mmseg, load_head
from spectralmoe_jax.conversion.rules import ConversionError, flatten_state
from tests.test_mask2former import abstract_head, build_hf_model, numpy_state_dict, our_config

# HF name -> mmdet name, written from the mmdet / mmcv module definitions (MSDeformAttnPixelDecoder
# with ConvModule conv/gn, DeformableDetrTransformerEncoderLayer norms.0/1, mmcv FFN layers.0.0 /
# layers.1, Mask2FormerTransformerDecoderLayer cross_attn / self_attn (mmcv MultiheadAttention
# wrapping nn.MultiheadAttention as `.attn`), norms.0 / 1 / 2, post_norm; Mask2FormerHead
# query_embed, query_feat, level_embed, cls_embed, mask_embed Sequential 0 / 2 / 4).
PIXEL = [
    (r"level_embed", r"level_encoding.weight"),
    (r"input_projections\.(\d)\.0\.", r"input_convs.\1.conv."),
    (r"input_projections\.(\d)\.1\.", r"input_convs.\1.gn."),
    (r"encoder\.layers\.(\d)\.self_attn_layer_norm\.", r"encoder.layers.\1.norms.0."),
    (r"encoder\.layers\.(\d)\.final_layer_norm\.", r"encoder.layers.\1.norms.1."),
    (r"encoder\.layers\.(\d)\.fc1\.", r"encoder.layers.\1.ffn.layers.0.0."),
    (r"encoder\.layers\.(\d)\.fc2\.", r"encoder.layers.\1.ffn.layers.1."),
    (r"encoder\.layers\.(\d)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"adapter_1\.0\.", r"lateral_convs.0.conv."),
    (r"adapter_1\.1\.", r"lateral_convs.0.gn."),
    (r"layer_1\.0\.", r"output_convs.0.conv."),
    (r"layer_1\.1\.", r"output_convs.0.gn."),
    (r"mask_projection\.", r"mask_feature."),
]
TRANSFORMER = [
    (r"queries_embedder\.", r"query_embed."),
    (r"queries_features\.", r"query_feat."),
    (r"level_embed\.", r"level_embed."),
    (r"decoder\.layers\.(\d)\.cross_attn\.", r"transformer_decoder.layers.\1.cross_attn.attn."),
    (
        r"decoder\.layers\.(\d)\.self_attn\.out_proj\.",
        r"transformer_decoder.layers.\1.self_attn.attn.out_proj.",
    ),
    (r"decoder\.layers\.(\d)\.cross_attn_layer_norm\.", r"transformer_decoder.layers.\1.norms.0."),
    (r"decoder\.layers\.(\d)\.self_attn_layer_norm\.", r"transformer_decoder.layers.\1.norms.1."),
    (r"decoder\.layers\.(\d)\.final_layer_norm\.", r"transformer_decoder.layers.\1.norms.2."),
    (r"decoder\.layers\.(\d)\.fc1\.", r"transformer_decoder.layers.\1.ffn.layers.0.0."),
    (r"decoder\.layers\.(\d)\.fc2\.", r"transformer_decoder.layers.\1.ffn.layers.1."),
    (r"decoder\.layernorm\.", r"transformer_decoder.post_norm."),
    (r"decoder\.mask_predictor\.mask_embedder\.0\.0\.", r"mask_embed.0."),
    (r"decoder\.mask_predictor\.mask_embedder\.1\.0\.", r"mask_embed.2."),
    (r"decoder\.mask_predictor\.mask_embedder\.2\.0\.", r"mask_embed.4."),
]


def _rename(name: str, table) -> str:
    for pattern, replacement in table:
        renamed, count = re.subn("^" + pattern, replacement, name)
        if count:
            return renamed
    raise KeyError(name)


def to_mmseg(hf_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under the released checkpoints' names (self-attention q/k/v fused)."""
    out = {}
    pixel, transformer = "model.pixel_level_module.decoder.", "model.transformer_module."
    for key, value in hf_state.items():
        if key.startswith(pixel):
            out["decode_head.pixel_decoder." + _rename(key[len(pixel) :], PIXEL)] = value
        elif key.startswith(transformer):
            match = re.fullmatch(
                r"decoder\.layers\.(\d)\.self_attn\.q_proj\.(weight|bias)", key[len(transformer) :]
            )
            if match:  # nn.MultiheadAttention stacks q, k, v in in_proj
                layer, kind = match.groups()
                parts = [
                    hf_state[f"{transformer}decoder.layers.{layer}.self_attn.{p}_proj.{kind}"]
                    for p in "qkv"
                ]
                out[
                    f"decode_head.transformer_decoder.layers.{layer}.self_attn.attn.in_proj_{kind}"
                ] = np.concatenate(parts)
            elif not re.search(r"self_attn\.[kv]_proj\.", key):
                out["decode_head." + _rename(key[len(transformer) :], TRANSFORMER)] = value
        elif key.startswith("class_predictor."):
            out["decode_head.cls_embed." + key.split(".")[-1]] = value
    return out


@pytest.fixture(scope="module")
def hf_state():
    return numpy_state_dict(build_hf_model())


def test_mmseg_naming_converts_to_the_hf_parameters(hf_state):
    from_hf = convert_hf(hf_state)
    mmseg = to_mmseg(hf_state)
    assert "decode_head.transformer_decoder.layers.0.cross_attn.attn.in_proj_weight" in mmseg
    from_mmseg = convert_mmseg(mmseg)
    assert sorted(from_mmseg) == sorted(from_hf)
    for key, value in from_hf.items():
        np.testing.assert_array_equal(from_mmseg[key], value, err_msg=key)
    # Exactly the head's parameters, with their shapes.
    ours = flatten_state(nnx.state(abstract_head(our_config()), nnx.Param))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in from_hf.items()}


def test_released_checkpoint_loads_without_query_embed(hf_state):
    """The released head deletes `query_embed` (the adapter supplies it); other keys of a full
    segmentor checkpoint (backbone, adapter) are left to their converters."""
    released = {
        k: v for k, v in to_mmseg(hf_state).items() if not k.startswith("decode_head.query_embed")
    }
    released["backbone.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    head = abstract_head(our_config(learn_query_position=False))
    load_head(head, released)
    loaded = flatten_state(nnx.state(head, nnx.Param))
    expected = convert_hf(hf_state)
    assert sorted(loaded) == sorted(k for k in expected if k != "transformer_decoder/query_pos")
    for key, value in loaded.items():
        np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg=key)
    with pytest.raises(
        ConversionError, match="missing from the checkpoint: transformer_decoder/query_pos"
    ):
        load_head(abstract_head(our_config()), released)


def test_mismatches_are_reported_by_name(hf_state):
    mmseg = to_mmseg(hf_state)
    with pytest.raises(ConversionError, match=r"decode_head\.decoder_input_projs\.0\.weight"):
        convert_mmseg({**mmseg, "decode_head.decoder_input_projs.0.weight": np.zeros((4, 4, 1, 1))})
    with pytest.raises(
        ConversionError,
        match=r"transformer_decoder/class_head/kernel: checkpoint \(64, 6\) vs model \(64, 8\)",
    ):
        load_head(abstract_head(our_config(num_classes=7)), hf_state)
    with pytest.raises(ConversionError, match="neither HF Mask2Former keys"):
        load_head(abstract_head(our_config()), {"backbone.x": np.zeros(1)})
