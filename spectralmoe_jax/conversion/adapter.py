"""Released adapter weights -> our `SpectralMoE` (both kinds), as tables of rules.

SpectralMoE: `DepthMoE` of daxichen/SpectralMoE-main (`models/backbones/depthmoe.py`), under
`backbone.depthmoe.` in the MMSegmentation state dict. Its per-layer parameters sit in nested
ParameterLists: `experts_a.{layer}.{expert}` [m, r], `experts_b.{layer}.{expert}` [r, d],
`w_gate.{layer}.{modality}` and `w_noise.{layer}.{modality}` [d, Ne] (modality 0 visual,
1 depth); the buffers `mean`, `std` (of the Normal in the load term) are constants and dropped.

REIN: `LoRAReins` of w1oves/Rein (`rein/models/backbones/reins.py`), under `backbone.reins.`:
`learnable_tokens_a` [L, m, r], `learnable_tokens_b` [L, r, d], one token set per layer.

Both hold `scale` [], `mlp_token2feat`, `mlp_delta_f`, `transform`, `merge` (PyTorch Linears).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from spectralmoe_jax.conversion.rules import (
    ConversionError,
    Rule,
    apply_rules,
    linear_kernel,
    load_into_module,
)
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE

PREFIXES = {"spectral_moe": r"(?:backbone\.)?depthmoe\.", "rein": r"(?:backbone\.)?reins\."}
_LINEARS = ("mlp_token2feat", "mlp_delta_f", "transform", "merge")
# Per-layer lists with a second index (expert or modality): stacked on axis 1 after the rules.
_NESTED = ("experts_a", "experts_b", "w_gate", "w_noise")


def _token_set_axis(x: np.ndarray) -> np.ndarray:
    """REIN's [L, ...] tokens -> our [L, 1, ...]: one token set per layer."""
    return x[:, None]


def _shared_rules(prefix: str) -> list[Rule]:
    rules = [Rule(prefix + r"scale", "scale")]
    for name in _LINEARS:
        rules.append(Rule(prefix + name + r"\.weight", name + "/kernel", linear_kernel))
        rules.append(Rule(prefix + name + r"\.bias", name + "/bias"))
    return rules


_SPECTRAL_MOE = PREFIXES["spectral_moe"]
SPECTRAL_MOE_RULES = tuple(
    [Rule(_SPECTRAL_MOE + name + r"\.(\d+)\.(\d+)", name + r".\2[{layer}]") for name in _NESTED]
    + _shared_rules(_SPECTRAL_MOE)
)
SPECTRAL_MOE_DROPPED = (_SPECTRAL_MOE + r"mean", _SPECTRAL_MOE + r"std")

_REIN = PREFIXES["rein"]
REIN_RULES = tuple(
    [
        Rule(_REIN + r"learnable_tokens_a", "experts_a", _token_set_axis),
        Rule(_REIN + r"learnable_tokens_b", "experts_b", _token_set_axis),
    ]
    + _shared_rules(_REIN)
)


def _stack_nested(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'experts_a.0': [L, m, r], 'experts_a.1': ...} -> {'experts_a': [L, E, m, r]}."""
    nested = {k: re.fullmatch(r"(\w+)\.(\d+)", k) for k in flat}
    out = {k: v for k, v in flat.items() if nested[k] is None}
    for name in _NESTED:
        parts = {int(m.group(2)): flat[k] for k, m in nested.items() if m and m.group(1) == name}
        if not parts:
            continue
        if sorted(parts) != list(range(len(parts))):
            raise ConversionError(f"{name}: second index {sorted(parts)} found, expected 0..{len(parts) - 1}")
        shapes = {i: v.shape for i, v in parts.items()}
        if len(set(shapes.values())) != 1:
            raise ConversionError(
                f"{name}: per-expert shapes differ {shapes}; only a uniform rank (lora_dims) is supported"
            )
        out[name] = np.stack([parts[i] for i in range(len(parts))], axis=1)
    return out


def convert_adapter(state_dict: Mapping[str, np.ndarray], config: AdapterConfig) -> dict[str, np.ndarray]:
    """The adapter keys of a released state dict -> {our parameter path: array}.

    Keys outside the adapter (frozen backbone, decode head) are ignored; within it, a key no rule
    consumes is an error naming it.
    """
    prefix = PREFIXES[config.kind]
    adapter = {k: v for k, v in state_dict.items() if re.match(prefix, k)}
    if not adapter:
        sample = ", ".join(list(state_dict)[:5])
        raise ConversionError(
            f"no {config.kind} adapter keys (matching {prefix!r}) in the state dict; first keys: {sample}"
        )
    if config.kind == "rein":
        rules, dropped = REIN_RULES, ()
    else:
        rules, dropped = SPECTRAL_MOE_RULES, SPECTRAL_MOE_DROPPED
    if not config.link_token_to_query:
        # The released modules build the query layers even when they are unused.
        dropped += tuple(prefix + name + r"\..*" for name in ("transform", "merge"))
    return _stack_nested(apply_rules(adapter, rules, allow_unexpected=dropped))


def load_adapter(state_dict: Mapping[str, np.ndarray], config: AdapterConfig) -> SpectralMoE:
    """Builds a `SpectralMoE` for `config` holding the released weights of `state_dict`.

    Missing, unexpected and mis-shaped parameters raise `ConversionError` naming them.
    """
    params = convert_adapter(state_dict, config)
    # Every parameter is overwritten, so only shapes are built: no random initialisation.
    module = nnx.eval_shape(lambda: SpectralMoE(config, rngs=nnx.Rngs(0)))
    load_into_module(module, params)
    return module
