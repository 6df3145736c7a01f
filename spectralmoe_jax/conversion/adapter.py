"""Released adapter weights -> our `SpectralMoE` (both kinds), as tables of rules.

SpectralMoE: `DepthMoE` of daxichen/SpectralMoE-main (`models/backbones/depthmoe.py`), under
`backbone.depthmoe.` in the MMSegmentation state dict. Its per-layer parameters sit in nested
ParameterLists: `experts_a.{layer}.{expert}` [m, r], `experts_b.{layer}.{expert}` [r, d],
`w_gate.{layer}.{modality}` and `w_noise.{layer}.{modality}` [d, Ne] (modality 0 visual,
1 depth); the buffers `mean`, `std` (of the Normal in the load term) must hold 0 and 1, the
constants our load term uses, and are dropped. These weights were trained with the released
math, which `implied_settings` names for the model that loads them.

REIN: `LoRAReins` of w1oves/Rein (`rein/models/backbones/reins.py`), under `backbone.reins.`:
`learnable_tokens_a` [L, m, r], `learnable_tokens_b` [L, r, d], one token set per layer.

Both hold `scale` [], `mlp_token2feat`, `mlp_delta_f`, `transform`, `merge` (PyTorch Linears).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from absl import logging
from flax import nnx

from spectralmoe_jax.conversion.rules import (
    ConversionError,
    Problems,
    Rule,
    apply_rules,
    check_params,
    linear_kernel,
    load_into_module,
    param_shapes,
)
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE

PREFIXES = {"spectral_moe": r"(?:backbone\.)?depthmoe\.", "rein": r"(?:backbone\.)?reins\."}
_LINEARS = ("mlp_token2feat", "mlp_delta_f", "transform", "merge")
# Per-layer lists with a second index (expert or modality), stacked as [L, E or G, ...].
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
    [Rule(_SPECTRAL_MOE + name + r"\.(\d+)\.(\d+)", name + "[{layer}]", layer_group=(1, 2))
     for name in _NESTED]
    + _shared_rules(_SPECTRAL_MOE)
)
# The Normal(mean, std) of `_prob_in_top_k`: constants, checked, not loaded.
_NORMAL_BUFFERS = {"mean": 0.0, "std": 1.0}

_REIN = PREFIXES["rein"]
REIN_RULES = tuple(
    [
        Rule(_REIN + r"learnable_tokens_a", "experts_a", _token_set_axis),
        Rule(_REIN + r"learnable_tokens_b", "experts_b", _token_set_axis),
    ]
    + _shared_rules(_REIN)
)


def adapter_keys(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """'spectral_moe' or 'rein' when the state dict holds released adapter keys, else None."""
    for kind, prefix in PREFIXES.items():
        if any(re.match(prefix, k) for k in state_dict):
            return kind
    return None


def implied_settings(state_dict: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The AdapterConfig fields a checkpoint's origin implies.

    Released `DepthMoE` weights (`backbone.depthmoe.*`, or bare `depthmoe.*`) were trained with
    the released math, which is a computation, not a parameter layout: the model must be built
    with it (`compat='released'`; its unset fusion is then the released diagonal form). REIN has
    one form, so its weights imply nothing. The loading path (`build.py`) applies these unless the
    config sets the field.
    """
    if adapter_keys(state_dict) == "spectral_moe":
        return {"compat": "released"}
    return {}


def log_implied(origin: str, implied: Mapping[str, object], config_fields: Mapping | None) -> None:
    """One line: what the checkpoint implies for the adapter, and what the config keeps against
    it (`config_fields`: the AdapterConfig fields the config sets; None: no adapter)."""
    if not implied or config_fields is None:
        return

    def text(fields):
        return ", ".join(f"model.adapter.{k}={v!r}" for k, v in fields.items())

    kept = {k: config_fields[k] for k in implied
            if config_fields.get(k) is not None and config_fields[k] != implied[k]}
    logging.warning("%s: the weights imply %s%s", origin, text(implied),
                    f"; the config sets {text(kept)}, kept" if kept else "")


def _check_normal_buffers(adapter: Mapping[str, np.ndarray], problems: Problems) -> None:
    for key, value in adapter.items():
        name = re.sub("^" + _SPECTRAL_MOE, "", key)
        if name in _NORMAL_BUFFERS and not np.allclose(np.asarray(value), _NORMAL_BUFFERS[name]):
            problems.other.append(
                f"{key} = {np.asarray(value).ravel()[:3]}: the load term's Normal is fixed at "
                f"mean 0, std 1 (released default); this checkpoint's differs")


def convert_adapter(state_dict: Mapping[str, np.ndarray], config: AdapterConfig) -> dict[str, np.ndarray]:
    """The adapter keys of a released state dict -> {our parameter path: array}.

    Keys outside the adapter (frozen backbone, decode head) are ignored; within it, every key no
    rule consumes, every parameter of `config`'s adapter left unfilled and every mis-shaped array
    is named in one `ConversionError`.
    """
    prefix = PREFIXES[config.kind]
    adapter = {k: v for k, v in state_dict.items() if re.match(prefix, k)}
    if not adapter:
        sample = ", ".join(list(state_dict)[:5])
        raise ConversionError(
            f"no {config.kind} adapter keys (matching {prefix!r}) in the state dict; first keys: {sample}"
        )
    problems = Problems()
    dropped: tuple[str, ...] = ()
    if config.kind == "rein":
        rules = REIN_RULES
    else:
        rules = SPECTRAL_MOE_RULES
        dropped = tuple(prefix + name for name in _NORMAL_BUFFERS)
        _check_normal_buffers(adapter, problems)
    if not config.link_token_to_query:
        # The released modules build the query layers even when they are unused.
        dropped += tuple(prefix + name + r"\..*" for name in ("transform", "merge"))
    expected = param_shapes(nnx.eval_shape(lambda: SpectralMoE(config, rngs=nnx.Rngs(0))))
    params = apply_rules(adapter, rules, allow_unexpected=dropped, expected=expected,
                         problems=problems)
    if any("experts_" in m for m in problems.mis_shaped):
        problems.other.append(f"(the model's experts have rank {config.rank} and "
                              f"{config.num_tokens} tokens; released `lora_dims` must be uniform)")
    check_params(params, expected, problems=problems)
    return params


def load_adapter(state_dict: Mapping[str, np.ndarray], config: AdapterConfig) -> SpectralMoE:
    """Builds a `SpectralMoE` for `config` holding the released weights of `state_dict`.

    Missing, unexpected and mis-shaped parameters raise `ConversionError` naming them.
    """
    params = convert_adapter(state_dict, config)
    # Every parameter is overwritten, so only shapes are built: no random initialisation.
    module = nnx.eval_shape(lambda: SpectralMoE(config, rngs=nnx.Rngs(0)))
    load_into_module(module, params)
    return module
