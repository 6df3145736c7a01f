"""Attention (padded and unpadded) against NumPy softmax attention; 2-D RoPE against DINOv3."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spectralmoe_jax.models.attention import dot_product_attention, resolve_implementation
from spectralmoe_jax.models.rope import apply_rope, rope_periods, rope_sincos
from tests.conftest import relative_error


def numpy_attention(q, k, v, bias=None, mask=None):
    logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.fixture
def qkv(np_rng):
    # 37 tokens: like 1029, not a multiple of any padding size.
    shape = (2, 37, 4, 8)
    return [np_rng.normal(size=shape).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("pad_multiple", [None, 16, 128])
def test_padding_never_changes_the_result(qkv, pad_multiple):
    out = dot_product_attention(*map(jnp.asarray, qkv), implementation="xla",
                                pad_multiple=pad_multiple)
    assert out.shape == (2, 37, 4, 8)
    assert relative_error(out, numpy_attention(*qkv)) <= 1e-6


def test_pallas_flash_attention_on_padded_tokens(np_rng):
    """jax's Pallas flash attention (in the interpreter on a CPU) on 37 tokens padded to 48:
    output and all three gradients equal XLA attention's. Head size 16: Triton's smallest."""
    q, k, v, cotangent = (jnp.asarray(np_rng.normal(size=(2, 37, 2, 16)), jnp.float32)
                          for _ in range(4))

    def outputs_and_grads(implementation):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, implementation=implementation, pad_multiple=16)
            return jnp.vdot(out, cotangent), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [out, *grads]

    # On a GPU the Triton kernels' float32 dots may run in TF32 (10-bit mantissa).
    tolerance = 5e-3 if jax.default_backend() == "gpu" else 1e-5
    for ours, reference in zip(outputs_and_grads("pallas"), outputs_and_grads("xla")):
        assert relative_error(ours, reference) <= tolerance
    with pytest.raises(ValueError, match="no bias or mask"):
        dot_product_attention(q, k, v, mask=jnp.ones((37, 37), bool), implementation="pallas")


def test_padded_path_pads_bias_and_mask(qkv, np_rng):
    bias = np_rng.normal(size=(2, 4, 37, 37)).astype(np.float32)
    mask = np_rng.random((2, 1, 37, 37)) > 0.3
    mask[..., 0] = True  # every row keeps at least one key
    expected = numpy_attention(*qkv, bias=bias, mask=mask)
    out = dot_product_attention(*map(jnp.asarray, qkv), bias=jnp.asarray(bias),
                                mask=jnp.asarray(mask), implementation="xla", pad_multiple=128)
    assert relative_error(out, expected) <= 1e-6


def test_implementation_choice():
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_implementation("auto", jnp.bfloat16) == ("cudnn" if on_gpu else "xla")
    assert resolve_implementation("auto", jnp.float32) == "xla"  # no fp32 flash kernel
    assert resolve_implementation(None, jnp.float32) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_implementation("flash", jnp.float32)


# --- RoPE: the facebookresearch/dinov3 formulas written out in torch ---------------------------

def torch_rope(h, w, head_dim, base=100.0):
    """dinov3 RopePositionEmbedding.forward (normalize_coords='separate', eval) -> (sin, cos)."""
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    coords_h = torch.arange(0.5, h, dtype=torch.float32) / h
    coords_w = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles), periods


def torch_rope_apply(x, sin, cos, prefix):
    """dinov3 SelfAttention.apply_rope on [B, heads, N, Dh]."""
    def rotate_half(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([-t2, t1], dim=-1)

    rotated = x[:, :, prefix:] * cos + rotate_half(x[:, :, prefix:]) * sin
    return torch.cat([x[:, :, :prefix], rotated], dim=-2)


@pytest.mark.parametrize("grid,head_dim", [((3, 5), 8), ((32, 32), 64)])
def test_rope_tables_match_dinov3(grid, head_dim):
    sin, cos = rope_sincos(grid, head_dim)
    ref_sin, ref_cos, periods = torch_rope(*grid, head_dim)
    np.testing.assert_allclose(rope_periods(head_dim), periods.numpy(), rtol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), atol=2e-6)
    np.testing.assert_allclose(cos, ref_cos.numpy(), atol=2e-6)


def test_rope_rotates_patch_tokens_only(np_rng):
    grid, prefix, head_dim = (3, 5), 3, 8
    x = np_rng.normal(size=(2, prefix + 15, 4, head_dim)).astype(np.float32)
    sin, cos = rope_sincos(grid, head_dim)
    ours = apply_rope(jnp.asarray(x), sin, cos, prefix)
    ref_sin, ref_cos, _ = torch_rope(*grid, head_dim)
    expected = torch_rope_apply(torch.from_numpy(x).transpose(1, 2), ref_sin, ref_cos, prefix)
    assert relative_error(ours, expected.transpose(1, 2).numpy()) <= 1e-6
    np.testing.assert_array_equal(np.asarray(ours[:, :prefix]), x[:, :prefix])
