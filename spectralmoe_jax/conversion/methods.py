"""Released SET, FADA and DepthForge weights -> our adapters (models/adapters/), as tables of
rules; and DepthForge's head addition (the Dynamic Query Correction Module).

SET (JingjunYi/SET) and FADA (JingjunYi/FADA) keep their `LoRAReins` under `backbone.reins.`,
DepthForge its `DepthForgeReins` under `backbone.depthforge.`; our parameters carry the
released names (`learnable_tokens_a` [L, m, r], ..., PyTorch Linears transposed). FADA's
`wavepool.{LL,LH,HL,HH}.weight` [d, 1, 2, 2] are fixed Haar kernels here: they are checked and
dropped. DepthForge's head holds `decode_head.DQCM.*` beside the Mask2Former keys.
LoRA, AdaptFormer and VPT have no released segmentation checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from spectralmoe_jax.conversion.rules import (ConversionError, Rule, apply_rules, conv_kernel,
                                              linear_kernel)

PREFIXES = {"set": r"(?:backbone\.)?reins\.", "fada": r"(?:backbone\.)?reins\.",
            "depthforge": r"(?:backbone\.)?depthforge\."}
_TOKENS = {
    "set": ("learnable_tokens_a", "learnable_tokens_b", "learnable_tokens2"),
    "fada": ("learnable_tokens_a", "learnable_tokens_b", "learnable_tokens_a2",
             "learnable_tokens_b2"),
    "depthforge": ("learnable_tokens_a", "learnable_tokens_b"),
}
_LINEARS = {
    "set": ("mlp_token2feat", "mlp_delta_f", "mlp_token2feat2", "mlp_delta_f2"),
    "fada": ("mlp_token2feat", "mlp_delta_f", "mlp_token2feat2", "mlp_delta_f2"),
    "depthforge": ("mlp_token2feat", "mlp_delta_f"),
}
HAAR = {"LL": [[1, 1], [1, 1]], "LH": [[-1, 1], [-1, 1]], "HL": [[-1, -1], [1, 1]],
        "HH": [[1, -1], [-1, 1]]}
# decode_head.DQCM: AdaptiveAttentionGate(channel_attention = Sequential(conv, ReLU, conv,
# Sigmoid), spatial_attention = conv) and linear_fuse.
_DQCM = {"attention_gate.channel_attention.0": "channel_reduce",
         "attention_gate.channel_attention.2": "channel_expand",
         "attention_gate.spatial_attention": "spatial", "linear_fuse": "fuse"}
DQCM_PREFIX = "decode_head.DQCM."


def adapter_rules(kind: str) -> list[Rule]:
    prefix = PREFIXES[kind]
    rules = [Rule(prefix + name, name) for name in _TOKENS[kind]]
    rules.append(Rule(prefix + "scale", "scale"))
    for name in _LINEARS[kind] + ("transform", "merge"):
        rules.append(Rule(prefix + name + r"\.weight", name + "/kernel", linear_kernel))
        rules.append(Rule(prefix + name + r"\.bias", name + "/bias"))
    return rules


def _check_haar(adapter: Mapping[str, np.ndarray], prefix: str) -> None:
    for band, kernel in HAAR.items():
        keys = [k for k in adapter if re.fullmatch(prefix + rf"wavepool\.{band}\.weight", k)]
        for key in keys:
            expected = np.broadcast_to(0.5 * np.asarray(kernel, np.float32),
                                       adapter[key].shape[-2:])
            if not np.allclose(adapter[key], expected, atol=1e-6):
                raise ConversionError(
                    f"{key}: not the fixed Haar kernel {band} (it was trained, as the released "
                    f"`set_requires_grad` allows); our FADA keeps the transform fixed")


def convert_method_adapter(state_dict: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """The released adapter keys of a SET / FADA / DepthForge state dict -> {our path: array};
    a key no rule consumes is an error naming it."""
    kind = config.kind
    if kind not in PREFIXES:
        raise ConversionError(f"no released checkpoint layout for adapter kind {kind!r}; "
                              f"known: {', '.join(PREFIXES)}")
    prefix = PREFIXES[kind]
    adapter = {k: v for k, v in state_dict.items() if re.match(prefix, k)}
    if not adapter:
        sample = ", ".join(list(state_dict)[:5])
        raise ConversionError(f"no {kind} adapter keys (matching {prefix!r}) in the state "
                              f"dict; first keys: {sample}")
    dropped = []
    if kind == "fada":
        _check_haar(adapter, prefix)
        dropped.append(prefix + r"wavepool\..*")
    if not config.link_token_to_query:
        dropped += [prefix + r"(transform|merge)\..*"]
    return apply_rules(adapter, adapter_rules(kind), allow_unexpected=dropped)


def split_query_correction(state_dict: Mapping[str, np.ndarray]):
    """(the state dict without `decode_head.DQCM.*`, {our head path: array} of those keys)."""
    rest = {k: v for k, v in state_dict.items() if not k.startswith(DQCM_PREFIX)}
    dqcm = {k[len(DQCM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DQCM_PREFIX)}
    rules = []
    for source, target in _DQCM.items():
        rules.append(Rule(re.escape(source) + r"\.weight", f"query_correction/{target}/kernel",
                          conv_kernel))
        rules.append(Rule(re.escape(source) + r"\.bias", f"query_correction/{target}/bias"))
    return rest, apply_rules(dqcm, rules)
