"""Checkpoint conversion as a table of rules.

A naming scheme is a list of `Rule`s. Each rule matches source keys with a regular expression and
names the target parameter path (a '/'-separated path into the NNX state, with `\\1`-style
references to the groups of the match) and the transform that turns the PyTorch array into ours.
Adding a naming scheme is adding rows; a key no rule consumes, or a parameter no key fills, is an
error that lists them by name.

Rules whose target contains `{layer}` stack per-block tensors: `blocks.(\\d+).attn.qkv.weight`
with target `blocks/attn/qkv/kernel[{layer}]` collects every block into one array with a leading
layer axis, the layout of our `scan`-ed layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from spectralmoe_jax.errors import UserError

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(UserError, ValueError):
    """A checkpoint that does not fit the model: names every offending key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # regular expression, matched against the whole source key
    target: str  # target path; may use \1.. group references and a trailing "[{layer}]"
    transform: Transform | None = None
    layer_group: int = 1  # which regex group holds the layer index for "[{layer}]" targets


# --- transforms, one per PyTorch layout ------------------------------------------------------

def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> our kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight OIHW -> our HWIO."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def squeeze_leading(x: np.ndarray) -> np.ndarray:
    """Drop leading singleton axes (PyTorch keeps cls tokens as [1, 1, D])."""
    while x.ndim > 1 and x.shape[0] == 1:
        x = x[0]
    return x


# --- applying a table ------------------------------------------------------------------------

def _matches(allowed: Iterable[str], key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in allowed)


def apply_rules(
    state_dict: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    *,
    allow_unexpected: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Maps a PyTorch state dict to {target path: array}.

    Source keys no rule consumes raise `ConversionError` unless a regular expression in
    `allow_unexpected` matches them.
    """
    flat: dict[str, np.ndarray] = {}
    stacked: dict[str, dict[int, np.ndarray]] = {}
    unexpected = []
    for key, value in state_dict.items():
        value = np.asarray(value)
        for rule in rules:
            match = re.fullmatch(rule.source, key)
            if match is None:
                continue
            array = (rule.transform or identity)(value)
            target = match.expand(rule.target.replace("[{layer}]", ""))
            if rule.target.endswith("[{layer}]"):
                stacked.setdefault(target, {})[int(match.group(rule.layer_group))] = array
            else:
                if target in flat:
                    raise ConversionError(f"two source keys map to {target!r} (second: {key!r})")
                flat[target] = array
            break
        else:
            if not _matches(allow_unexpected, key):
                unexpected.append(key)
    if unexpected:
        raise ConversionError(
            f"{len(unexpected)} unexpected key(s) in the checkpoint (no conversion rule): "
            + ", ".join(sorted(unexpected))
            + ". Allow them by name if they are meant to be dropped."
        )
    for target, layers in stacked.items():
        expected = list(range(len(layers)))
        if sorted(layers) != expected:
            raise ConversionError(
                f"{target!r}: layers {sorted(layers)} found, expected 0..{len(layers) - 1}"
            )
        flat[target] = np.stack([layers[i] for i in expected])
    return flat


def flatten_state(state) -> dict[str, object]:
    """NNX state (or nested dict) -> {'a/b/c': leaf}."""
    from flax import nnx

    if isinstance(state, nnx.State):
        state = nnx.to_pure_dict(state)
    out = {}

    def visit(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    visit("", state)
    return out


def check_params(params: Mapping[str, np.ndarray], expected: Mapping[str, object], *,
                 allow_missing: Sequence[str] = (), where: str = "") -> None:
    """Every parameter of `expected` (path -> array or shape struct) that `params` does not fill,
    every converted array the model has no place for, and every shape mismatch, in one
    `ConversionError`; parameters matched by a regular expression in `allow_missing` may stay
    unfilled."""
    missing = [k for k in expected if k not in params and not _matches(allow_missing, k)]
    extra = [k for k in params if k not in expected]
    bad_shape = [
        f"{k}: checkpoint {tuple(np.shape(params[k]))} vs model {tuple(np.shape(expected[k]))}"
        for k in expected
        if k in params and tuple(np.shape(params[k])) != tuple(np.shape(expected[k]))
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(sorted(missing))}")
    if extra:
        problems.append(f"converted but not in the model: {', '.join(sorted(extra))}")
    if bad_shape:
        problems.append("shape mismatch: " + "; ".join(bad_shape))
    if problems:
        raise ConversionError((f"{where}: " if where else "") + " | ".join(problems))


def load_into_module(
    module,
    params: Mapping[str, np.ndarray],
    *,
    allow_missing: Sequence[str] = (),
    variable_type=None,
) -> None:
    """Writes converted arrays into an NNX module in place, checking names and shapes
    (`check_params`); unfilled parameters allowed by `allow_missing` keep their values."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    variable_type = variable_type or nnx.Param
    state = nnx.state(module, variable_type)
    check_params(params, flatten_state(state), allow_missing=allow_missing)

    def fill(path, leaf):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        if key in params:
            return jnp.asarray(params[key], dtype=leaf.dtype)
        return leaf

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


