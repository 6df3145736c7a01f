"""Sharding, declared once: logical axis names, one rule table per strategy, one resolver.

Parameters carry logical axis names as Variable metadata (`logical_axes`, set on the modules:
`nnx.Linear(..., kernel_metadata=axes("embed", "mlp"))`, `nnx.Param(x, **axes(...))`); stacked
layers prepend 'layers' (`models/stacking.py`). A few activations are pinned with `constrain`.
A strategy (`mesh.strategy`) names the mesh axes it uses and maps logical names to them; the mesh
sizes come from the config (`mesh.data`, `mesh.fsdp`, ...), never from code. A name without a
rule, and a parameter without names, is replicated.

Our own metadata key rather than flax's `out_sharding`: flax shards a Variable carrying
`out_sharding` as it is created, which needs a mesh wherever a module is built (every test,
every conversion); plain metadata is resolved here, only where a mesh exists.

The resolver is strict, so a layout is never silently other than the table says: an unknown
name, a name count that does not match the array, a mesh axis used twice in one array or a size
that does not divide over its mesh axes is a `ShardingError` naming the array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from spectralmoe_jax.errors import UserError

METADATA_KEY = "logical_axes"

# The logical axes of parameters and activations.
LOGICAL_AXES = {
    "batch": "examples of a batch (activations)",
    "tokens": "token positions (activations)",
    "layers": "the stacked-layer axis of scanned blocks",
    "embed": "the model width d",
    "mlp": "the MLP's hidden units",
    "qkv": "the fused q | k | v projection's outputs",
    "heads": "attention heads times head width (the output projection's inputs)",
    "experts": "the adapter's experts (token sets, gate columns)",
}

MESH_AXES = ("data", "fsdp", "tensor", "expert")


class ShardingError(UserError, ValueError):
    """A mesh or layout the devices or arrays cannot take: names the array, sizes and axes."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    axes: tuple[str, ...]  # the mesh axes, in mesh order (the first is split between processes)
    rules: Mapping[str, str | tuple[str, ...]]  # logical name -> mesh axis or axes
    summary: str


STRATEGIES = {
    "dp": Strategy(
        axes=("data",), rules={"batch": "data"},
        summary="data parallel: every parameter replicated, the batch split over all devices"),
    "fsdp": Strategy(
        axes=("data", "fsdp"), rules={"batch": ("data", "fsdp"), "embed": "fsdp"},
        summary="fully sharded: every weight with a width axis split over fsdp (gathered per "
                "layer inside the scan), the batch over data x fsdp"),
    "tensor": Strategy(
        axes=("data", "fsdp", "tensor"),
        rules={"batch": ("data", "fsdp"), "embed": "fsdp", "mlp": "tensor", "qkv": "tensor",
               "heads": "tensor"},
        summary="fsdp plus Megatron-style tensor parallelism: MLP hidden units and attention "
                "projections split over tensor, whose devices share a batch"),
    "expert": Strategy(
        axes=("data", "expert"), rules={"batch": "data", "experts": "expert"},
        summary="the adapter's experts and their dense computation split over expert, whose "
                "devices share a batch"),
}


def axes(*names: str | None) -> dict:
    """Variable metadata naming an array's axes: `nnx.Param(x, **axes("experts", None))`;
    nothing when every name is None (replicated either way)."""
    return {METADATA_KEY: tuple(names)} if any(n is not None for n in names) else {}


def strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ShardingError(f"config mesh.strategy={name!r}: expected one of "
                            f"{', '.join(STRATEGIES)}")
    return STRATEGIES[name]


# --- the mesh -------------------------------------------------------------------------------------

def mesh_shape(mesh_config, device_count: int) -> dict[str, int]:
    """{axis: size} of the strategy's mesh; one axis may be -1 (the devices the others leave)."""
    chosen = strategy(mesh_config.strategy)
    sizes = {axis: int(getattr(mesh_config, axis)) for axis in MESH_AXES}
    unused = {a: s for a, s in sizes.items() if a not in chosen.axes and s != 1}
    if unused:
        a, s = next(iter(unused.items()))
        raise ShardingError(f"config mesh.{a}={s}, but strategy {mesh_config.strategy!r} has no "
                            f"{a!r} axis (its axes: {', '.join(chosen.axes)}); set "
                            f"mesh.strategy or mesh.{a}=1")
    shape = {a: sizes[a] for a in chosen.axes}
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for s in shape.values()):
        raise ShardingError(f"config mesh sizes {shape}: give positive sizes, at most one -1")
    known = math.prod(s for s in shape.values() if s != -1)
    if free:
        if device_count % known:
            raise ShardingError(f"config mesh {shape}: {known} does not divide the "
                                f"{device_count} devices")
        shape[free[0]] = device_count // known
    if math.prod(shape.values()) != device_count:
        given = ", ".join(f"mesh.{a}={getattr(mesh_config, a)}" for a in chosen.axes)
        raise ShardingError(f"config {given} (strategy {mesh_config.strategy!r}) uses "
                            f"{math.prod(shape.values())} devices; there are {device_count} devices")
    return shape


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """The mesh of `mesh_config` (`RunConfig.mesh`) over all devices of all processes.

    Auto axes on purpose: shardings are given at the jit boundary and by a few constraints,
    and XLA propagates the rest (jax >= 0.9 defaults to Explicit)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                         axis_types=(AxisType.Auto,) * len(shape))


# --- the resolver ---------------------------------------------------------------------------------

def logical_to_spec(names, shape, mesh, rules: Mapping, *, where: str = "array") -> P:
    """Logical names of an array's axes -> PartitionSpec on `mesh` under `rules`.

    Mesh axes of size 1 shard nothing and are left out. `names` None: replicated."""
    if names is None:
        return P()
    names, shape = tuple(names), tuple(shape)
    if len(names) != len(shape):
        raise ShardingError(f"{where}: {len(names)} logical axes {names} for an array of "
                            f"shape {shape}")
    used, spec = set(), []
    for dim, name in zip(shape, names):
        if name is not None and name not in LOGICAL_AXES:
            raise ShardingError(f"{where}: unknown logical axis {name!r} (known: "
                                f"{', '.join(LOGICAL_AXES)})")
        target = rules.get(name) if name is not None else None
        target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        missing = [a for a in target if a not in mesh.shape]
        if missing:
            raise ShardingError(f"{where}: logical axis {name!r} maps to mesh axis "
                                f"{missing[0]!r}, which the mesh {dict(mesh.shape)} lacks")
        target = tuple(a for a in target if mesh.shape[a] > 1)
        if used & set(target):
            raise ShardingError(f"{where}: mesh axes {target} used twice in {names}")
        size = math.prod(mesh.shape[a] for a in target)
        if dim % size:
            over = " x ".join(f"{a!r} ({mesh.shape[a]})" for a in target)
            raise ShardingError(f"{where}: logical axis {name!r} (size {dim}) does not divide "
                                f"over mesh axis {over}: use a mesh size that divides {dim}")
        used.update(target)
        spec.append(None if not target else target[0] if len(target) == 1 else target)
    return P(*spec)


def names_of(variable) -> tuple | None:
    """The logical axis names a Variable carries, or None."""
    return variable.get_metadata().get(METADATA_KEY) if isinstance(variable, nnx.Variable) else None


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def variable_shardings(state, mesh, strategy_name: str):
    """The tree of `state` (an nnx.State of Variables, abstract or not) with every Variable's
    value replaced by its NamedSharding: what `jax.jit(out_shardings=...)` takes."""
    rules = strategy(strategy_name).rules

    def place(path, variable):
        spec = logical_to_spec(names_of(variable), variable.shape, mesh, rules,
                               where=_path(path))
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=_is_variable)


def flat_variables(state) -> dict[str, nnx.Variable]:
    """{'a/b/c': Variable} of an nnx.State."""
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable)
    return {_path(path): v for path, v in leaves}


def param_sharding(mesh, strategy_name: str):
    """(path, Variable) -> NamedSharding: what `build.build_segmentor(sharding=...)` takes."""
    rules = strategy(strategy_name).rules

    def place(path: str, variable) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(names_of(variable), variable.shape, mesh,
                                                   rules, where=path))

    return place


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --- activations ----------------------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def active_rules(mesh, strategy_name: str):
    """Makes `constrain` pin activations on `mesh` while a function is traced under it."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, strategy(strategy_name).rules)
    try:
        yield
    finally:
        _ACTIVE.value = previous


def traced_with_rules(fn, mesh, strategy_name: str):
    """`fn` with the rules active whenever it is traced: wrap before `jax.jit`, so every trace
    of the jitted function sees them (a context around the jit call would miss retraces)."""
    def wrapped(*args, **kwargs):
        with active_rules(mesh, strategy_name):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`with_sharding_constraint` by logical names; the identity where no rules are active
    (single-device code, tests, evaluation of a process-local copy)."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules, where=f"activation {names}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --- batches and process-local copies -------------------------------------------------------------

def batch_sharding(mesh, strategy_name: str, ndim: int = 1) -> NamedSharding:
    rules = strategy(strategy_name).rules
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (0,) * ndim,
                                               mesh, rules))


def batch_devices(mesh, strategy_name: str) -> int:
    """How many ways the batch is split: the global batch must be a multiple."""
    target = strategy(strategy_name).rules.get("batch") or ()
    target = (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[a] for a in target)


def global_batch(batch: Mapping, mesh, strategy_name: str) -> dict:
    """This process's rows of a batch (numpy) -> global arrays split over the batch's mesh axes.

    Process p holds rows [p b, (p + 1) b) of the global batch: the mesh lists each process's
    devices as one contiguous block of its first axis."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == object or value.dtype.kind in "SU":
            continue  # names and paths stay on the host
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, strategy_name, value.ndim), value)
    return out


def process_local(tree):
    """A copy of `tree` this process can compute with alone (its first local device), for work
    each process does on its own share, such as evaluating its tiles. Arrays this process holds
    whole are kept; arrays spanning processes are copied from a local replica, or gathered from
    every process (a collective: all processes call it together)."""
    device = jax.local_devices()[0]

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.sharding.is_fully_replicated:
            return jax.device_put(x.addressable_shards[0].data, device)
        from jax.experimental import multihost_utils

        return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                              device)

    return jax.tree.map(local, tree)


_BARRIERS = [0]  # barriers passed by this process: all processes pass the same ones in order


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Returns once every process has reached this point (the coordination service's barrier,
    not a device collective). Called after each process compiled a program and before the
    program's first collective: on CPU, gloo gives up on a collective whose peers arrive more
    than 30 s apart, and compile times differ between processes (only process 0 writes the
    persistent compilation cache)."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    _BARRIERS[0] += 1
    multihost.get_barrier_sync_fn()(key=f"{name} #{_BARRIERS[0]}", timeout_ms=timeout_s * 1000)
