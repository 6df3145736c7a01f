"""The released CLIP wrapper's pyramid -> `models.neck.CLIPFeaturePyramid`, as a table of rules.

A SpectralMoE CLIP checkpoint keeps the pyramid beside the adapter (`DepthMoECLIPVisionTransformer
.state_dict` keeps keys containing 'depthmoe' or 'fpn'): `backbone.fpn1.{0 GroupNorm, 1
ConvTranspose, 2 SyncBatchNorm, 4 ConvTranspose}`, `fpn2.{0 GroupNorm, 1 ConvTranspose}`, `fpn3`
(GroupNorm), `fpn4.0` (GroupNorm). ConvTranspose2d weights [in, out, i, j] become our [i, j, in,
out]; the batch norm's running statistics are `nnx.BatchStat`s, loaded beside the parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from spectralmoe_jax.conversion.rules import ConversionError, Rule, apply_rules, load_into_module

PREFIX = r"(?:backbone\.)?"
_NORMS = {"fpn1\\.0": "norms/0", "fpn2\\.0": "norms/1", "fpn3": "norms/2", "fpn4\\.0": "norms/3"}
_CONV_T = {"fpn1\\.1": "up4_a", "fpn1\\.4": "up4_b", "fpn2\\.1": "up2"}
STATS = ("up4_bn/mean", "up4_bn/var")


def _conv_transpose_kernel(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 3, 0, 1))


NECK_RULES = tuple(
    [rule for source, target in _NORMS.items()
     for rule in (Rule(PREFIX + source + r"\.weight", target + "/scale"),
                  Rule(PREFIX + source + r"\.bias", target + "/bias"))]
    + [rule for source, target in _CONV_T.items()
       for rule in (Rule(PREFIX + source + r"\.weight", target + "/kernel",
                         _conv_transpose_kernel),
                    Rule(PREFIX + source + r"\.bias", target + "/bias"))]
    + [Rule(PREFIX + r"fpn1\.2\.weight", "up4_bn/scale"),
       Rule(PREFIX + r"fpn1\.2\.bias", "up4_bn/bias"),
       Rule(PREFIX + r"fpn1\.2\.running_mean", "up4_bn/mean"),
       Rule(PREFIX + r"fpn1\.2\.running_var", "up4_bn/var")]
)
DROPPED = (PREFIX + r"fpn1\.2\.num_batches_tracked",)


def convert_neck(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `fpn*` keys of a released state dict -> {our path: array} (parameters and stats)."""
    neck = {k: np.asarray(v) for k, v in state_dict.items() if re.match(PREFIX + r"fpn\d", k)}
    if not neck:
        raise ConversionError("no CLIP pyramid keys (backbone.fpn1 .. fpn4) in the state dict; "
                              f"first keys: {', '.join(list(state_dict)[:5])}")
    return apply_rules(neck, NECK_RULES, allow_unexpected=DROPPED)


def load_neck(module, params: Mapping[str, np.ndarray]) -> None:
    """Fills a `CLIPFeaturePyramid` from `convert_neck`'s output, checking names and shapes."""
    stats = {k: v for k, v in params.items() if k in STATS}
    load_into_module(module, {k: v for k, v in params.items() if k not in STATS})
    load_into_module(module, stats, variable_type=nnx.BatchStat)
