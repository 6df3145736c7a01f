"""What every part builds: `Program`s on a `Context`.

A part (one module of this folder) turns the run's context into programs: a function, its
arguments built once (random arrays, or only their shapes and dtypes when nothing runs), and how
each argument is laid out on a mesh. `scripts/benchmark.py` compiles and times them on the local
device; `scripts/aot_check.py` compiles the same programs for a GPU or TPU it does not have.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[2]

# How an argument is laid out on a mesh of axes ('data', 'model'): every leaf replicated,
# the frozen backbone weights (replicated, or FSDP over 'model' when the mesh config asks), or
# an int: the batch axis of every leaf, split over 'data'.
REPLICATED = "replicated"
FROZEN = "frozen"


@dataclasses.dataclass
class Program:
    """One jitted function and its arguments: what is compiled, measured and reported."""

    name: str
    fn: Callable
    args: tuple
    layout: tuple = ()  # per argument: REPLICATED, FROZEN or a batch axis; () = all replicated
    donate: tuple[int, ...] = ()
    images: int | None = None  # images per call, for images/s
    flops_analytic: float | None = None  # a closed form of the matmul FLOPs, a check of the count
    carry: bool = False  # fn returns (next first argument, aux): the donated train state
    replicated_outputs: bool = False  # outputs replicated, as the trainer asks of the step
    timed: bool = True  # False: compile only (memory of a batch that need not run)
    info: dict = dataclasses.field(default_factory=dict)  # extra fields for the record

    def argument_layout(self, index: int):
        return self.layout[index] if self.layout else REPLICATED


@dataclasses.dataclass
class Context:
    """The run: config (`RunConfig`), model (random weights, or shapes only when `abstract`),
    batch, crop."""

    config: Any
    model: Any  # models.segmentor.Segmentor
    batch: int
    size: int
    abstract: bool
    options: Any  # the command line's part-specific knobs (argparse.Namespace)

    @property
    def dtype(self):
        return jnp.dtype(self.config.model.dtype)

    def array(self, key, shape, dtype=jnp.float32):
        """A random normal input, or only its shape and dtype when nothing runs."""
        if self.abstract:
            return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    def like(self, key, tree):
        """Random arrays shaped like a tree of arrays / ShapeDtypeStructs."""
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [self.array(k, x.shape, x.dtype)
                                            for k, x in zip(keys, leaves)])

    def labels(self, key, batch: int, size: int):
        """Semantic labels with every class present: 32 x 32-pixel blocks of random classes
        (the matcher's worst case, one target per class)."""
        if self.abstract:
            return jax.ShapeDtypeStruct((batch, size, size), jnp.int32)
        blocks = jax.random.randint(key, (batch, size // 32, size // 32), 0,
                                    self.config.data.num_classes)
        return jnp.repeat(jnp.repeat(blocks, 32, axis=1), 32, axis=2).astype(jnp.int32)

    def build(self, constructor: Callable[[], nnx.Module]) -> nnx.Module:
        """A module with random weights, or its shapes only when nothing runs."""
        return nnx.eval_shape(constructor) if self.abstract else constructor()


def load_config(path: str):
    """`configs/NAME.py[:variant]` -> its `get_config(variant)`."""
    from spectralmoe_jax import config_lib

    path, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location(
        "bench_config", path if os.path.isabs(path) else ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_lib.parse_variant(variant or None))


def apply_overrides(config, *, dtype=None, attention=None, remat=None, vfm=None,
                    decoder_attention=None):
    """The command line's model choices, written into the config before the model is built."""
    if decoder_attention:
        config.model.decoder.attention_implementation = decoder_attention
    if dtype:
        config.model.dtype = dtype
    if vfm:
        config.model.vfm.preset = vfm
    if attention:
        for name in ("vfm", "depth"):
            config.model[name].overrides["attention"] = attention
    if remat:
        config.model.vfm.overrides["remat"] = remat
    return config


def build_segmentor(run, abstract: bool):
    """The run's segmentor with random weights (no checkpoint is read: timing and memory do not
    depend on them), or its shapes only."""
    from spectralmoe_jax.models.segmentor import Segmentor

    config = run.model.segmentor()
    return nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(run.seed))) \
        if abstract else Segmentor(config, rngs=nnx.Rngs(run.seed))
