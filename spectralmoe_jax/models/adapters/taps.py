"""What the in-block methods (LoRA, AdaptFormer, VPT) share: their per-layer state handed to the
ViT's scan as `BlockTaps.params` (models/vit.py), and the dropout they apply in training.

A method keeps one module per layer stacked (`models/stacking.py`, like the ViT's blocks); its
state goes through the scan's xs beside the block parameters, so each block sees its own slice
and the backward accumulates into the stacked arrays. Randomness comes in as one key per layer,
scanned the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def scan_params(layers: nnx.Module | None, extra: dict | None = None, *, rng=None,
                num_layers: int = 0) -> dict[str, Any]:
    """{'layer': the stacked layers' state, 'key': [L, 2] per-layer keys (when `rng`), ...}."""
    params = dict(extra or {})
    if layers is not None:
        params["layer"] = nnx.state(layers)
    if rng is not None:
        params["key"] = jax.random.split(rng, num_layers)
    return params


def layer_module(layers: nnx.Module, p: dict) -> nnx.Module:
    """This block's layer: the stacked module's graph with the scan's slice of its state."""
    return nnx.merge(nnx.graphdef(layers), p["layer"])


def dropout(x: jax.Array, rate: float, p: dict, salt: int = 0) -> jax.Array:
    """Inverted dropout with this block's key (torch semantics: kept values scaled by 1/(1-rate));
    the identity without a key (evaluation) or at rate 0."""
    if rate <= 0 or "key" not in p:
        return x
    key = jax.random.fold_in(p["key"], salt)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class InBlockAdapter(nnx.Module):
    """The adapter contract's side of an in-block method: `block_taps(train=, rng=)` gives the
    ViT its `BlockTaps`; it links no tokens to the decoder queries (the plain head)."""

    def block_taps(self, *, train: bool, rng=None):
        raise NotImplementedError

    def query_embedding(self) -> None:
        return None
