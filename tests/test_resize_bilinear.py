"""Bilinear resizing from shifted copies (models/resize.py) against PyTorch and jax.image.resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import relative_error
from spectralmoe_jax.models.resize import resize_bilinear


def torch_resize(x: np.ndarray, size) -> np.ndarray:
    """F.interpolate over the last two axes of [B, Q, H, W] (the mask layout)."""
    out = torch.nn.functional.interpolate(torch.from_numpy(x), size=tuple(size), mode="bilinear",
                                          align_corners=False)
    return out.numpy()


@pytest.mark.parametrize("size", [(24, 40), (12, 20), (18, 30), (48, 80),  # up 4, 2, 3, 8
                                  (3, 5), (6, 10), (1, 5),  # down 2, 1 and 2, 6 and 2
                                  (12, 5), (9, 7)])  # up one axis, down the other; no integer
def test_matches_torch_interpolate(size):
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 10)).astype(np.float32)
    ours = resize_bilinear(jnp.asarray(x), (2, 3, *size))
    assert ours.shape == (2, 3, *size)
    assert relative_error(ours, torch_resize(x, size)) < 1e-6


def test_gradient_equals_jax_image_resize_and_no_matmul_or_gather():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 4)), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 4, 4)), jnp.float32)

    def loss(resize, x):
        return jnp.sum(resize(x, (2, 32, 4, 4)) * cotangent)

    ours = jax.grad(lambda x: loss(resize_bilinear, x))(x)
    reference = jax.grad(lambda x: loss(
        lambda x, s: jax.image.resize(x, s, "linear", antialias=False), x))(x)
    assert relative_error(ours, reference) < 1e-6
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: loss(resize_bilinear, x)))(x))
    assert "dot_general" not in jaxpr and "gather" not in jaxpr and "transpose" not in jaxpr


def test_keeps_the_dtype():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    assert resize_bilinear(x, (1, 16, 2, 2)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rank"):
        resize_bilinear(x, (16, 2))
