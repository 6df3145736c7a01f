"""Checkpoint conversion as a table of rules.

A naming scheme is a list of `Rule`s. Each rule matches source keys with a regular expression and
names the target parameter path (a '/'-separated path into the NNX state, with `\\1`-style
references to the groups of the match) and the transform that turns the PyTorch array into ours.
Adding a naming scheme is adding rows; a key no rule consumes, or a parameter no key fills, is an
error that lists them by name.

Rules whose target contains `{layer}` stack per-block tensors: `blocks.(\\d+).attn.qkv.weight`
with target `blocks/attn/qkv/kernel[{layer}]` collects every block into one array with a leading
layer axis, the layout of our `scan`-ed layers.

A checkpoint that does not fit is reported once, with every missing, unexpected and mis-shaped
key by name and per-layer gaps as ranges ("blocks/attn/qkv/kernel (layers 1, 3 of 0..3)"):
converters collect into one `Problems` and raise one `ConversionError` at the end.
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
    # Regex group(s) of the index for "[{layer}]" targets: one group stacks [L, ...]; a tuple
    # such as (1, 2) stacks nested lists [L, E, ...] (the released per-layer, per-expert lists).
    layer_group: int | tuple[int, ...] = 1


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


# --- what went wrong, collected and reported once -----------------------------------------

_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a dot-separated numeric component of a key


def compact_names(names: Iterable[str]) -> str:
    """Sorted names, those that differ only in numeric components folded into one:
    'blocks.{0, 2, 3}.attn.qkv.weight'. Keeps a long list of per-layer keys one readable line."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for name in names:
        template = _INDEX.sub("{}", name)
        groups.setdefault(template, []).append(tuple(int(i) for i in _INDEX.findall(name)))
    out = []
    for template, indices in sorted(groups.items()):
        columns = [sorted(set(column)) for column in zip(*indices)]
        if len(indices) == 1 or len(set(indices)) != int(np.prod([len(c) for c in columns])):
            out += [template.format(*i) for i in sorted(indices)]  # not a full grid: one by one
            continue
        out.append(template.format(*("{" + _ranges(c) + "}" for c in columns)))
    return ", ".join(out)


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}..{v}")
            start = None
    return ", ".join(parts)


@dataclasses.dataclass
class Problems:
    """Everything a conversion found wrong; `raise_if_any` reports it all as one line."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mis_shaped: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)
    # target path -> the source key that filled it, to name keys in shape messages
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    # targets already reported (a stacked target with bad layers is not "missing" on top)
    reported: set[str] = dataclasses.field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped or self.other)

    def extend(self, other: "Problems", where: str = "") -> None:
        tag = (lambda x: f"{where}: {x}") if where else (lambda x: x)
        self.missing += map(tag, other.missing)
        self.unexpected += map(tag, other.unexpected)
        self.mis_shaped += map(tag, other.mis_shaped)
        self.other += map(tag, other.other)

    def message(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing from the checkpoint: {', '.join(sorted(self.missing))}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) (no conversion rule, allow "
                         f"them by name if meant to be dropped): {compact_names(self.unexpected)}")
        if self.mis_shaped:
            parts.append("shape mismatch: " + "; ".join(self.mis_shaped))
        parts += self.other
        return " | ".join(parts)

    def raise_if_any(self, where: str = "") -> None:
        if self:
            raise ConversionError(f"{where}: {self.message()}" if where else self.message())


def _shape(expected, key: str) -> tuple[int, ...] | None:
    """The model's shape at `key` (`expected` maps paths to shapes, arrays or shape structs)."""
    if expected is None or key not in expected:
        return None
    value = expected[key]
    return tuple(value) if isinstance(value, tuple) else tuple(np.shape(value))


def _expected_layers(target: str, depth: int, expected):
    """The leading layer axes of a stacked target in the model, or None if unknown."""
    shape = _shape(expected, target)
    return None if shape is None or len(shape) < depth else shape[:depth]


def _stack(target: str, parts: dict[tuple[int, ...], np.ndarray], keys: dict, expected,
           problems: Problems) -> np.ndarray | None:
    """Stacks per-layer arrays into [L, ...] (or [L, E, ...] for two indices), or records why not:
    missing or surplus layers against the model (or gaps in what the file holds) and layers
    whose shape differs from the others', each by name."""
    depth = len(next(iter(parts)))
    counts = _expected_layers(target, depth, expected)
    if counts is None:  # unknown model: the file's own range
        counts = tuple(max(i[a] for i in parts) + 1 for a in range(depth))
    wanted = set(np.ndindex(*counts))
    label = "layers" if depth == 1 else "entries"
    span = " x ".join(f"0..{c - 1}" for c in counts)
    fmt = (lambda i: str(i[0])) if depth == 1 else str
    ok = True
    missing = sorted(wanted - set(parts))
    if missing:
        problems.missing.append(f"{target} ({label} {', '.join(map(fmt, missing))} of {span})")
        ok = False
    surplus = sorted(set(parts) - wanted)
    if surplus:
        problems.unexpected += [keys[i] for i in surplus]
        ok = False
    # Per-layer shapes against each other; the stack against the model in `check_params`
    # (after any resize a converter applies, e.g. relative-position tables).
    shapes = [parts[i].shape for i in sorted(parts)]
    element = max(set(shapes), key=shapes.count)
    for i in sorted(set(parts) & wanted):
        if parts[i].shape != element:
            problems.mis_shaped.append(
                f"{keys[i]} -> {target}[{', '.join(map(str, i))}]: checkpoint "
                f"{tuple(parts[i].shape)} vs {element} in the other layers")
            ok = False
    problems.sources[target] = compact_names(keys.values())
    if not ok:
        problems.reported.add(target)
        return None
    return np.stack([parts[i] for i in sorted(wanted)]).reshape(*counts, *element)


# --- applying a table ------------------------------------------------------------------------

def _matches(allowed: Iterable[str], key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in allowed)


def apply_rules(
    state_dict: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    *,
    allow_unexpected: Sequence[str] = (),
    expected: Mapping[str, tuple[int, ...]] | None = None,
    problems: Problems | None = None,
) -> dict[str, np.ndarray]:
    """Maps a PyTorch state dict to {target path: array}.

    Problems are collected, not raised one by one: source keys no rule consumes (unless a
    regular expression in `allow_unexpected` matches them), and stacked targets with missing,
    surplus or mis-shaped layers. With `expected` ({target path: shape} of the model) layer
    counts and per-layer shapes come from the model, so a missing last layer is seen too.
    Without `problems` they raise at the end as one `ConversionError`; with it they are added
    there, for the caller to check more (`check_params`) before raising.
    """
    own = problems is None
    problems = Problems() if own else problems
    flat: dict[str, np.ndarray] = {}
    stacked: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    stacked_keys: dict[str, dict[tuple[int, ...], str]] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        for rule in rules:
            match = re.fullmatch(rule.source, key)
            if match is None:
                continue
            array = (rule.transform or identity)(value)
            target = match.expand(rule.target.replace("[{layer}]", ""))
            if rule.target.endswith("[{layer}]"):
                groups = rule.layer_group if isinstance(rule.layer_group, tuple) else (rule.layer_group,)
                index = tuple(int(match.group(g)) for g in groups)
                stacked.setdefault(target, {})[index] = array
                stacked_keys.setdefault(target, {})[index] = key
            elif target in flat:
                problems.other.append(
                    f"two source keys map to {target!r}: {problems.sources[target]!r} and {key!r}")
            else:
                flat[target] = array
                problems.sources[target] = key
            break
        else:
            if not _matches(allow_unexpected, key):
                problems.unexpected.append(key)
    for target, parts in stacked.items():
        array = _stack(target, parts, stacked_keys[target], expected, problems)
        if array is not None:
            flat[target] = array
    if own:
        problems.raise_if_any()
    return flat


def check_params(
    params: Mapping[str, np.ndarray],
    expected: Mapping[str, object],
    *,
    allow_missing: Sequence[str] = (),
    where: str = "",
    problems: Problems | None = None,
) -> None:
    """Converted arrays against the model (`expected`: path -> shape, array or shape struct):
    parameters nothing fills (unless a regular expression in `allow_missing` matches them),
    arrays the model has no place for, shapes that differ. Raises one `ConversionError` with
    these and whatever `problems` already holds."""
    problems = Problems() if problems is None else problems
    for key in expected:
        if key not in params and key not in problems.reported and not _matches(allow_missing, key):
            problems.missing.append(key)
    extra = [k for k in params if k not in expected]
    if extra:
        problems.other.append(f"converted but not in the model: {', '.join(sorted(extra))}")
    for key in expected:
        if key in params and tuple(np.shape(params[key])) != _shape(expected, key):
            source = problems.sources.get(key)
            named = f"{source} -> {key}" if source else key
            problems.mis_shaped.append(
                f"{named}: checkpoint {tuple(np.shape(params[key]))} vs model {_shape(expected, key)}")
    problems.raise_if_any(where)


def param_shapes(module, variable_type=None) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a module's parameters (an abstract module from `nnx.eval_shape` will do)."""
    from flax import nnx

    state = nnx.state(module, variable_type or nnx.Param)
    return {k: tuple(np.shape(v)) for k, v in flatten_state(state).items()}


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


def load_into_module(
    module,
    params: Mapping[str, np.ndarray],
    *,
    allow_missing: Sequence[str] = (),
    variable_type=None,
) -> None:
    """Writes converted arrays into an NNX module in place, checking names and shapes.

    Parameters of the module that `params` does not fill raise `ConversionError` unless matched by
    a regular expression in `allow_missing` (they keep their initial values); every problem is
    listed in that one error (`check_params`).
    """
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

    pure = nnx.to_pure_dict(state)
    import jax

    pure = jax.tree_util.tree_map_with_path(fill, pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
