"""LoRA (Hu et al. 2021) on the frozen blocks' projections, as peft's `LoraLayer` computes it.

For a target linear y = x W + b of block l: y + (alpha / r) dropout(x) A_l B_l, with A [in, r]
(peft's `lora_A.weight` transposed, kaiming_uniform(a=sqrt 5): U(+-1/sqrt(in))) and B [r, out]
(`lora_B.weight` transposed, zeros), so training starts at the frozen model. The paper's Table 3
count, 0.79 M on ViT-L, is r = 8 on q and v (the LoRA paper's targets; peft's defaults
r = alpha = 8): 24 x 2 x (8 x 1024 + 8 x 1024) = 786,432.

Targets: 'q', 'k', 'v' (column blocks of the fused qkv projection, as peft on separate
q_proj / k_proj / v_proj), 'qkv' (the fused projection as one target, peft on timm's `qkv`),
'proj', 'fc1', 'fc2' (MLP) or 'w1', 'w2', 'w3' (SwiGLU). LoRA touches every token (class,
storage and patch tokens); the decoder is the plain Mask2Former head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spectralmoe_jax.models.adapters import taps as taps_lib
from spectralmoe_jax.models.spectral_moe import AdapterConfig, _uniform
from spectralmoe_jax.models.stacking import stacked
from spectralmoe_jax.models.vit import BlockTaps, ViTConfig

QKV = ("q", "k", "v")
SITES = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "qkv": "attn.qkv",
         "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
         "w1": "mlp.w1", "w2": "mlp.w2", "w3": "mlp.w3"}


def target_shape(target: str, vit: ViTConfig) -> tuple[int, int]:
    """(in, out) features of a target linear of `vit`'s blocks."""
    d, hidden = vit.width, vit.mlp_dim
    return {"qkv": (d, 3 * d), "fc1": (d, hidden), "w1": (d, hidden), "w2": (d, hidden),
            "fc2": (hidden, d), "w3": (hidden, d)}.get(target, (d, d))


def check_targets(targets, vit: ViTConfig) -> None:
    unknown = [t for t in targets if t not in SITES]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"AdapterConfig.lora_targets={tuple(targets)}: give distinct targets "
                         f"among {tuple(SITES)}")
    if "qkv" in targets and set(targets) & set(QKV):
        raise ValueError(f"AdapterConfig.lora_targets={tuple(targets)}: 'qkv' is the fused "
                         f"projection; it overlaps 'q', 'k', 'v'")
    mlp = {"mlp": ("fc1", "fc2"), "swiglu": ("w1", "w2", "w3")}[vit.ffn]
    wrong = [t for t in targets if t in ("fc1", "fc2", "w1", "w2", "w3") and t not in mlp]
    if wrong:
        raise ValueError(f"AdapterConfig.lora_targets {wrong}: this ViT's feed-forward is "
                         f"{vit.ffn!r}, whose linears are {mlp}")


class LoRALayer(nnx.Module):
    """One block's factors: a_<target> [in, r], b_<target> [r, out]."""

    def __init__(self, targets, vit: ViTConfig, rank: int, *, rngs: nnx.Rngs):
        for target in targets:
            d_in, d_out = target_shape(target, vit)
            setattr(self, f"a_{target}",
                    nnx.Param(_uniform(1.0 / math.sqrt(d_in))(rngs.params(), (d_in, rank))))
            setattr(self, f"b_{target}", nnx.Param(jnp.zeros((rank, d_out), jnp.float32)))


class LoRA(taps_lib.InBlockAdapter):
    """LoRA factors for every block (`layers`, stacked), consulted inside the blocks."""

    def __init__(self, config: AdapterConfig, vit: ViTConfig, *, rngs: nnx.Rngs):
        check_targets(config.lora_targets, vit)
        self.config = config
        self.vit = vit
        self.layers = stacked(lambda rngs: LoRALayer(config.lora_targets, vit, config.lora_rank,
                                                     rngs=rngs), config.num_layers, rngs)

    def block_taps(self, *, train: bool, rng=None) -> BlockTaps:
        c = self.config
        keyed = train and c.lora_dropout > 0
        params = taps_lib.scan_params(self.layers, rng=rng if keyed else None,
                                      num_layers=c.num_layers)
        sites = frozenset(SITES[t] for t in c.lora_targets)
        return BlockTaps(params=params, sites=sites, delta=self.delta)

    def delta(self, site: str, p, x: jax.Array) -> jax.Array:
        """(alpha / r) dropout(x) A B for the targets at `site`: the q, k, v blocks of the fused
        projection as one down-projection and a block-structured up-projection."""
        c = self.config
        layer = taps_lib.layer_module(self.layers, p)
        dtype = jnp.dtype(c.dtype)
        x = x.astype(dtype)
        targets = [t for t in c.lora_targets if SITES[t] == site]
        downs = [taps_lib.dropout(x, c.lora_dropout, p, salt=list(SITES).index(t))
                 @ getattr(layer, f"a_{t}")[...].astype(dtype) for t in targets]
        if site == "attn.qkv" and "qkv" not in targets:
            d = self.vit.width
            zeros = jnp.zeros((c.lora_rank, d), dtype)
            up = jnp.concatenate([
                jnp.concatenate([getattr(layer, f"b_{t}")[...].astype(dtype) if t == block
                                 else zeros for block in QKV], axis=1)
                for t in targets], axis=0)
        else:
            up = jnp.concatenate([getattr(layer, f"b_{t}")[...].astype(dtype)
                                  for t in targets], axis=0)
        delta = jnp.concatenate(downs, axis=-1) @ up
        return delta * (c.lora_alpha / c.lora_rank)
