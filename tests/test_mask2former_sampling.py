"""Building blocks of the Mask2Former head against PyTorch: deformable bilinear sampling
(F.grid_sample semantics at borders and on non-square levels), resizing, position encoding,
reference points, the attention-mask rule and semantic inference."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Mask2FormerConfig as HFMask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as hf

from spectralmoe_jax.models.mask2former import semantic_inference
from spectralmoe_jax.models.mask2former.layers import resize_bilinear
from spectralmoe_jax.models.mask2former.ms_deform_attn import (
    MultiScaleDeformableAttention,
    deformable_sample,
)
from spectralmoe_jax.models.mask2former.pixel_decoder import reference_points
from spectralmoe_jax.models.mask2former.position_encoding import sine_position_encoding
from spectralmoe_jax.models.mask2former.transformer_decoder import attention_mask
from tests.conftest import jaxpr_equations, relative_error

SHAPES = ((5, 7), (3, 4), (2, 3))  # non-square levels, fine to coarse


def _sampling_inputs(rng, batch=2, queries=11, heads=3, head_dim=5, points=4, exact_points=True):
    tokens = sum(h * w for h, w in SHAPES)
    value = rng.normal(size=(batch, tokens, heads, head_dim)).astype(np.float32)
    # Up to 30% outside the map on every side: the zero padding and the border taps matter.
    locations = rng.uniform(-0.3, 1.3, size=(batch, queries, heads, len(SHAPES), points, 2))
    if exact_points:  # on the border and on a pixel centre (kinks: no unique gradient there)
        locations[0, 0, 0, :, 0] = 0.0
        locations[0, 0, 0, :, 1] = 1.0
        locations[0, 1, 0, 0, 0] = [0.5 / SHAPES[0][1], 0.5 / SHAPES[0][0]]
    weights = rng.uniform(0.0, 1.0, size=(batch, queries, heads, len(SHAPES), points))
    return value, locations.astype(np.float32), weights.astype(np.float32)


def test_deformable_sample_matches_hf_grid_sample(np_rng):
    value, locations, weights = _sampling_inputs(np_rng)
    ours = jax.jit(deformable_sample, static_argnums=1)(value, SHAPES, locations, weights)
    theirs = hf.multi_scale_deformable_attention(
        torch.from_numpy(value),
        list(SHAPES),
        torch.from_numpy(locations),
        torch.from_numpy(weights),
    )
    assert ours.shape == (2, 11, 15)
    assert relative_error(ours, theirs.numpy()) <= 1e-6


def test_deformable_sample_gradients_match_torch(np_rng):
    value, locations, weights = _sampling_inputs(np_rng, queries=5, exact_points=False)
    cotangent = np_rng.normal(size=(2, 5, 15)).astype(np.float32)

    def loss(v, loc, w):
        return jnp.sum(deformable_sample(v, SHAPES, loc, w) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, locations, weights)
    tensors = [torch.from_numpy(a).requires_grad_() for a in (value, locations, weights)]
    out = hf.multi_scale_deformable_attention(tensors[0], list(SHAPES), tensors[1], tensors[2])
    (out * torch.from_numpy(cotangent)).sum().backward()
    for ours, tensor in zip(grads, tensors):
        assert relative_error(ours, tensor.grad.numpy()) <= 1e-5


def test_bfloat16_value_gradient_accumulates_in_float32(np_rng):
    """The gather's transpose, a scatter-add over the value table, runs on float32 rows."""
    value, locations, weights = _sampling_inputs(np_rng, queries=5)
    value = jnp.asarray(value, jnp.bfloat16)

    def loss(v):
        return jnp.sum(deformable_sample(v, SHAPES, locations, weights).astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(value).jaxpr
    scatters = [e for e in jaxpr_equations(jaxpr) if e.primitive.name == "scatter-add"]
    assert scatters and all(e.invars[0].aval.dtype == jnp.float32 for e in scatters)
    assert jax.grad(loss)(value).dtype == jnp.bfloat16
    assert deformable_sample(value, SHAPES, locations, weights).dtype == jnp.bfloat16


def test_single_tap_is_grid_sample_with_zero_padding(np_rng):
    """One level, one point, weight 1: exactly F.grid_sample(align_corners=False, zeros)."""
    height, width = 4, 9
    image = np_rng.normal(size=(1, 2, height, width)).astype(np.float32)  # NCHW, 2 channels
    locations = np_rng.uniform(-0.5, 1.5, size=(1, 40, 2)).astype(np.float32)
    locations[0, :4] = [[-0.2, 0.5], [1.2, 0.5], [0.5, 5.0], [0.0, 0.0]]  # far outside, corner
    grid = torch.from_numpy(2 * locations - 1)[:, :, None]  # [N, H_out=40, W_out=1, 2]
    expected = F.grid_sample(
        torch.from_numpy(image), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[
        0, :, :, 0
    ].T.numpy()  # [40, 2]
    value = image.reshape(1, 1, 2, height * width).transpose(0, 3, 1, 2)  # [1, HW, heads=1, 2]
    ours = deformable_sample(
        jnp.asarray(value),
        ((height, width),),
        locations[:, :, None, None, None, :],
        jnp.ones((1, 40, 1, 1, 1)),
    )
    assert relative_error(ours[0], expected) <= 1e-6
    np.testing.assert_array_equal(np.asarray(ours[0, :3]), 0.0)  # nothing within reach


def test_resize_bilinear_matches_interpolate(np_rng):
    x = np_rng.normal(size=(2, 3, 16, 24)).astype(np.float32)
    for size in ((2, 3), (4, 6), (32, 48), (5, 7)):  # down x8, x4, up x2, non-integer
        expected = F.interpolate(
            torch.from_numpy(x), size=size, mode="bilinear", align_corners=False
        )
        ours = resize_bilinear(jnp.asarray(x), (2, 3, *size))
        assert relative_error(ours, expected.numpy()) <= 1e-6, size


def test_sine_position_encoding_matches_hf():
    expected = hf.Mask2FormerSinePositionEmbedding(num_position_features=32, normalize=True)(
        torch.Size((1, 64, 5, 7)), "cpu", torch.float32
    )
    ours = sine_position_encoding(5, 7, 32)
    assert ours.shape == (5, 7, 64)
    assert relative_error(ours, expected[0].permute(1, 2, 0).numpy()) <= 1e-6


def test_reference_points_match_hf():
    expected = hf.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(
        list(SHAPES), torch.ones(1, len(SHAPES), 2), "cpu"
    )
    np.testing.assert_allclose(
        np.asarray(reference_points(SHAPES)), expected[0, :, 0].numpy(), rtol=1e-6
    )


def test_attention_mask_rule(np_rng):
    """Reference: HF's mask predictor threshold and the released empty-row rule
    `attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False`."""
    logits = np_rng.normal(size=(2, 6, 16, 24)).astype(np.float32)
    logits[0, 1] = -np.abs(logits[0, 1]) - 0.1  # masked everywhere: must attend everywhere
    logits[1, 2] = np.abs(logits[1, 2]) + 0.1  # attends everywhere
    masked = (
        F.interpolate(torch.from_numpy(logits), size=(4, 6), mode="bilinear", align_corners=False)
        .sigmoid()
        .flatten(2)
        < 0.5
    )
    masked[torch.where(masked.sum(-1) == masked.shape[-1])] = False
    ours = attention_mask(jnp.asarray(logits), (4, 6))
    assert ours.shape == (2, 1, 6, 24) and ours.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(ours[:, 0]), ~masked.numpy())
    assert bool(ours[0, 0, 1].all()) and 0 < int(ours[0, 0, 0].sum()) < 24


def test_semantic_inference_against_numpy(np_rng):
    queries, classes = 7, 4
    class_logits = (3 * np_rng.normal(size=(2, queries, classes + 1))).astype(np.float32)
    mask_logits = (3 * np_rng.normal(size=(2, queries, 5, 6))).astype(np.float32)
    ours = np.asarray(semantic_inference(jnp.asarray(class_logits), jnp.asarray(mask_logits)))

    c = class_logits.astype(np.float64)
    probs = np.exp(c - c.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    masks = 1 / (1 + np.exp(-mask_logits.astype(np.float64)))
    expected = np.einsum("bqk,bqhw->bhwk", probs[..., :-1], masks)
    assert ours.shape == (2, 5, 6, classes)
    assert relative_error(ours, expected) <= 1e-6
    # Per pixel: non-negative scores whose sum over classes is sum_q (1 - p_no-object) sigmoid,
    # within [0, Q].
    total = np.einsum("bq,bqhw->bhw", 1 - probs[..., -1], masks)
    np.testing.assert_allclose(ours.sum(-1), total, rtol=1e-5)
    assert ours.min() >= 0 and ours.sum(-1).max() <= queries


def test_deformable_attention_init_matches_hf():
    """Deformable DETR's initial sampling pattern (HF `_init_weights`, mmcv `init_weights`)."""
    reference = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(
        embed_dim=32, num_heads=8, n_levels=3, n_points=4
    )
    hf.Mask2FormerPreTrainedModel._init_weights(
        SimpleNamespace(config=HFMask2FormerConfig()), reference
    )
    ours = MultiScaleDeformableAttention(32, 8, 3, 4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        np.asarray(ours.sampling_offsets.bias[...]),
        reference.sampling_offsets.bias.detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    for linear in (ours.sampling_offsets, ours.attention_weights):
        np.testing.assert_array_equal(np.asarray(linear.kernel[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(ours.attention_weights.bias[...]), 0.0)
