"""The released heads (`DepthMoEMask2FormerHead`, REIN's `ReinMask2FormerHead`) converted from
their key names compute as released: mmdet's Mask2Former (here HF's, shown equal to mmdet's
naming in test_mask2former_conversion.py) with the adapter's `return_auto` queries as query
positions, and for REIN `querys2feat` of them as query features; `predict` upsamples the last
layer's masks to the image and scores softmax(class)[:-1] x sigmoid(mask)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from spectralmoe_jax.conversion.segmentor import checkpoint_parts, convert_trained_parts
from spectralmoe_jax.evaluation.runner import semantic_scores
from spectralmoe_jax.models.mask2former import Mask2FormerHead
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE
from tests.conftest import relative_error
from tests.released_reference import ReleasedDepthMoE, ReleasedLoRAReins, load_released
from tests.test_mask2former import (
    IMAGE, TOL, build_hf_model, hf_decoder_outputs, nhwc, numpy_state_dict, our_config)
from tests.test_mask2former_conversion import to_mmseg
from tests.test_spectral_moe import REIN, SPECTRAL, released_state

ADAPTER = dict(num_layers=3, width=32, num_experts=3, rank=4, num_tokens=8, num_queries=8,
               query_dim=64)  # the HF head's 8 queries of width 64


@pytest.fixture(scope="module")
def reference():
    """A tiny HF Mask2Former (one decoder layer: the head's structure, not its depth, is the
    point here) and its pixel decoder's outputs on random backbone features."""
    model = build_hf_model(seed=3, decoder_layers=2)
    with torch.no_grad():
        features = model.model.pixel_level_module.encoder(torch.randn(2, 3, *IMAGE)).feature_maps
        pixel_out = model.model.pixel_level_module.decoder(features)
    return {"model": model, "features": [nhwc(f) for f in features],
            "multi_scale": pixel_out.multi_scale_features, "mask_features": pixel_out.mask_features}


class Parts(nnx.Module):
    """The segmentor's trained parts, as `Segmentor` configures them for a linked adapter."""

    def __init__(self, kind):
        self.adapter = SpectralMoE(AdapterConfig(**ADAPTER, kind=kind), rngs=nnx.Rngs(0))
        self.head = Mask2FormerHead(our_config(decoder_layers=1, learn_query_position=False,
                                               replace_query_feat=kind == "rein"), rngs=nnx.Rngs(0))


def released_checkpoint(reference, kind):
    """A released MMSeg state dict: the adapter and `decode_head.*` without `query_embed`; REIN's
    head also has `querys2feat` in place of `query_feat`."""
    head = to_mmseg(numpy_state_dict(reference["model"]))
    del head["decode_head.query_embed.weight"]
    if kind == "rein":
        del head["decode_head.query_feat.weight"]
        rng = np.random.default_rng(2)
        head["decode_head.querys2feat.weight"] = (0.1 * rng.normal(size=(64, 64))).astype(np.float32)
        head["decode_head.querys2feat.bias"] = (0.1 * rng.normal(size=64)).astype(np.float32)
    return {**released_state(AdapterConfig(**ADAPTER, kind=kind)), **head}


def released_queries(state, kind):
    if kind == "rein":
        module = ReleasedLoRAReins(3, 32, 4, 8, 64)
        load_released(module, state, REIN)
    else:
        module = ReleasedDepthMoE(3, 32, 3, 4, 8, 64, top_k=1)
        load_released(module, state, SPECTRAL)
    with torch.no_grad():
        return module.return_auto()


@pytest.mark.parametrize("kind", ["spectral_moe", "rein"])
def test_converted_released_head_computes_as_released(reference, kind):
    state = released_checkpoint(reference, kind)
    assert checkpoint_parts(state) == ("adapter", "head")
    parts = nnx.eval_shape(lambda: Parts(kind))
    from spectralmoe_jax.conversion.rules import load_into_module

    load_into_module(parts, convert_trained_parts(state, parts))

    # The released forward: query_embed = return_auto(), expanded over the batch; query_feat the
    # learned table, or querys2feat(query_embed) with replace_query_feat (REIN).
    model, queries = reference["model"], released_queries(state, kind)
    module = model.model.transformer_module
    saved = (module.queries_embedder.weight.clone(), module.queries_features.weight.clone())
    try:
        with torch.no_grad():
            module.queries_embedder.weight.copy_(queries)
            if kind == "rein":
                w, b = (torch.tensor(state[f"decode_head.querys2feat.{n}"]) for n in ("weight", "bias"))
                module.queries_features.weight.copy_(queries @ w.T + b)
            classes, masks = hf_decoder_outputs(model, reference["multi_scale"],
                                                reference["mask_features"])
    finally:
        with torch.no_grad():
            module.queries_embedder.weight.copy_(saved[0])
            module.queries_features.weight.copy_(saved[1])

    @nnx.jit
    def run(parts, features):
        return parts.head(features, query_embedding=parts.adapter.query_embedding())

    out = run(parts, reference["features"])
    assert relative_error(out["class_logits"], classes) <= TOL
    assert relative_error(out["mask_logits"], masks) <= TOL

    # `predict`: last layer's masks upsampled to the image (bilinear, align_corners=False),
    # softmax over classes without no-object, times sigmoid, summed over queries.
    images = np.zeros((2, *IMAGE, 3), np.float32)
    scores = semantic_scores(lambda x, train: out, images)
    upsampled = F.interpolate(torch.tensor(masks[-1]), size=IMAGE, mode="bilinear", align_corners=False)
    expected = torch.einsum("bqc,bqhw->bchw", F.softmax(torch.tensor(classes[-1]), -1)[..., :-1],
                            upsampled.sigmoid())
    assert relative_error(scores, expected.permute(0, 2, 3, 1).numpy()) <= TOL
