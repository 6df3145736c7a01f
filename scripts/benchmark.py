r"""The training step and each of its parts: time, compile time, memory, FLOPs and MFU (issue 7).

  python scripts/benchmark.py --config configs/flair.py --batch 8 --size 512 --parts all \
      --steps 20 --out bench.json                # full ViT-L configuration, on a GPU
  python scripts/benchmark.py --tiny --out bench_tiny.json      # configs/demo.py, minutes on a CPU
  python scripts/benchmark.py --config configs/flair.py --parts step --compile-only --hlo \
      --out compile.json                         # FLOPs, memory and HLO statistics, nothing runs

Parts (`--parts`, 'all' = every part but 'backbones' and 'fit'):
  matmul     the measured matmul peak (compute dtype, e.g. bf16) that MFU is measured against
  attention  the VFM's self-attention alone, forward and forward + backward, per kernel
             (--attention-impls: XLA, cuDNN and Pallas flash attention on a GPU)
  vfm        the frozen VFM forward, and forward + backward to a trainable per-block term (SPEC 4)
  depth      the depth encoder forward (all blocks, no gradient)
  adapter    one adapter layer next to one ViT block (scripts/bench_adapter.py), and the VFM with
             the adapter after all blocks, forward + backward to the adapter's parameters
  decoder    pixel decoder and masked-attention decoder, forward and forward + backward
  loss       Mask2Former loss with Hungarian matching, forward + backward; the matcher alone
  optimizer  the AdamW update of the trainable parameters
  step       the whole jitted train step (state donated), images/s
  eval       the evaluation runner's compiled inference (config.eval), images/s
  input      the grain input pipeline, tiles/s (scripts/bench_input.py)
  backbones  each ViT-L preset's forward (scripts/bench_backbone.py)
  fit        compile the train step at --fit-batch (16) and report its memory (nothing runs)

Every timed figure is the median of `--steps` runs after `--warmup` runs, each blocked until
ready. FLOPs: `flops_model` counts the matmuls and convolutions of the traced program
(`jaxpr_flops`: scan bodies times their length, cuDNN attention included); `flops_xla` is XLA's
cost analysis, which counts a loop body once (one ViT block of 24) and elementwise work, kept for
reference; `flops_analytic` is a closed form for the ViTs (`vit_flops`), a check of the count.
MFU = flops_model / median time / the measured matmul peak.
Weights are random: timing does not depend on them. The JSON is rewritten after every part.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from spectralmoe_jax import config_lib  # noqa: E402
from spectralmoe_jax.evaluation.runner import make_model_infer, patch_multiple  # noqa: E402
from spectralmoe_jax.models.attention import (  # noqa: E402
    dot_product_attention, resolve_implementation)
from spectralmoe_jax.models.segmentor import Segmentor, split_model  # noqa: E402
from spectralmoe_jax.training.mask2former_loss import (  # noqa: E402
    mask2former_loss, match_queries, sample_point_draws, semantic_to_targets)
from spectralmoe_jax.training.optimizer import make_optimizer  # noqa: E402
from spectralmoe_jax.training.train_state import init_train_state, make_train_step  # noqa: E402
from spectralmoe_jax.training.trainer import loss_config_from  # noqa: E402

# The step right after the peak: a run cut short by a time limit still has the key figures.
DEFAULT_PARTS = ("matmul", "step", "eval", "vfm", "attention", "depth", "adapter", "decoder", "loss",
                 "optimizer", "input")


def load_script(name: str):
    """A sibling script (scripts/bench_*.py) as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def load_config(path: str):
    """`configs/NAME.py[:variant]` -> its `get_config(variant)`."""
    path, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", ROOT / path if not
                                                  os.path.isabs(path) else path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_lib.parse_variant(variant or None))


# --- analytic FLOPs ----------------------------------------------------------------------------

def vit_flops(vit_config, batch: int, image_hw: tuple[int, int], *, backward: bool) -> dict:
    """Matmul FLOPs (2 per multiply-add) of a ViT forward, or forward + backward as the train step
    runs it: every block's input gradient (the scan's backward runs all of them, block 0's
    included), no weight gradient (frozen). Attention backward = dP, dQ, dK, dV: 2x forward.

    A check of `jaxpr_flops` (they agree exactly for the XLA attention path). Elementwise work
    (norms, softmax, GELU, RoPE) is not counted: it is not matmul-unit work.
    """
    c = vit_config
    n = (image_hw[0] // c.patch_size) * (image_hw[1] // c.patch_size)
    t = n + 1 + c.num_register_tokens
    d = c.width
    ffn = (3 if c.ffn == "swiglu" else 2) * d * c.mlp_dim
    dense = 2 * batch * t * (4 * d * d + ffn)  # qkv, proj and the FFN, per block
    attention = 4 * batch * t * t * d  # q k^T and p v, per block
    patch = 2 * batch * n * c.patch_size ** 2 * c.in_channels * d
    forward = patch + c.depth * (dense + attention)
    out = {"tokens": t, "dense": c.depth * dense, "attention": c.depth * attention,
           "forward": forward, "total": forward}
    if backward:
        out["attention"] += c.depth * 2 * attention
        out["dense"] += c.depth * dense
        out["total"] = forward + c.depth * (dense + 2 * attention)
    return out


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs (2 per multiply-add) of a jaxpr: dot_general, convolutions and cuDNN
    attention, with scan bodies counted `length` times and the costlier branch of a cond.

    XLA's `cost_analysis()` counts a while loop's body once, so for a ViT under `lax.scan` it
    sees one block of 24; the jaxpr knows the trip count. While loops of unknown trip count (the
    matcher's) count once: they hold no matmuls. Recomputation under `jax.checkpoint` is
    counted (only the deformable sampling is rematerialised, and it has no matmul, unless a
    ViT's `remat` policy is set). Pallas kernels (attention='pallas') are opaque: not counted,
    see `pallas_calls`.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2.0 * math.prod(out) * math.prod(shapes[0][i] for i in contract)
        elif name == "conv_general_dilated":
            rhs, spec = shapes[1], eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[spec[0]]
        elif name.startswith("dot_product_attention_"):  # cuDNN: fwd q k^T, p v; bwd 4 products
            q, k = shapes[0], shapes[1]
            bnth = "BNTH" in str(eqn.params.get("layout", ""))
            t, s_len = (q[2], k[2]) if bnth else (q[1], k[1])
            products = 4 if "bwd" in name else 2
            total += 2.0 * products * math.prod(q) * s_len / t
        sub = [jaxpr_flops(j) for j in jax_core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(sub, default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * sum(sub)
        else:
            total += sum(sub)
    return total


# --- measurement -------------------------------------------------------------------------------

def pallas_calls(jaxpr) -> int:
    """How many Pallas kernels a jaxpr calls (their FLOPs are missing from `jaxpr_flops`)."""
    return sum((eqn.primitive.name == "pallas_call")
               + sum(pallas_calls(j) for j in jax_core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})
    return {"flops_xla": float(analysis.get("flops", 0.0)),
            "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


def memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(analysis, f, 0) or 0)
           for f in fields}
    # What the program holds at once: inputs, outputs and scratch, donated inputs counted once.
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    return out


def device_peak() -> int | None:
    """The backend's peak bytes in use so far in this process (GPU/TPU; None on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def median_ms(call, steps: int, warmup: int) -> dict:
    """Median and spread of `call()` (blocked until ready) over `steps` runs after `warmup`."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(1e3 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "steps": steps}


@dataclasses.dataclass
class Bench:
    """What every part needs: the options, the model split, inputs, and the records so far."""

    args: argparse.Namespace
    config: object
    model: Segmentor
    records: dict = dataclasses.field(default_factory=dict)
    peak_flops: float | None = None  # measured matmul peak, FLOP/s

    @property
    def abstract(self) -> bool:
        return self.args.compile_only

    def array(self, key, shape, dtype=jnp.float32):
        """A random normal input, or only its shape and dtype when nothing runs."""
        if self.abstract:
            return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
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

    def measure(self, name: str, fn, args: tuple, *, donate: tuple = (), images: int | None = None,
                flops_analytic: float | None = None, carry: bool = False,
                hlo: bool = False) -> dict:
        """Compiles `fn(*args)`, counts its FLOPs, reads XLA's cost and memory analyses, and
        times it. carry=True: `fn` returns (new first argument, aux), which the next call takes,
        as the donated train state.
        """
        jitted = jax.jit(fn, donate_argnums=donate)
        start = time.perf_counter()
        traced = jitted.trace(*args)
        lowered = traced.lower()
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        record = {"lower_s": lower_s, "compile_s": time.perf_counter() - start,
                  "flops_model": jaxpr_flops(traced.jaxpr.jaxpr), **cost(compiled),
                  "memory": memory(compiled)}
        if flops_analytic is not None:
            record["flops_analytic"] = flops_analytic
        if uncounted := pallas_calls(traced.jaxpr.jaxpr):
            record["pallas_calls_uncounted"] = uncounted
            if flops_analytic is not None:  # the closed form does see inside the kernels
                record["flops_model"] = flops_analytic
        if hlo or self.args.hlo:
            text = compiled.as_text()
            record["hlo"] = hlo_stats(text)
            if self.args.dump_hlo:
                os.makedirs(self.args.dump_hlo, exist_ok=True)
                Path(self.args.dump_hlo, f"{name}.hlo.txt").write_text(text)
        if not self.abstract:
            state = list(args)

            def call():
                out = compiled(*state)
                if carry:
                    state[0] = out[0]
                return out

            record.update(median_ms(call, self.args.steps, self.args.warmup))
            seconds = record["median_ms"] / 1e3
            record["tflops_per_s"] = record["flops_model"] / seconds / 1e12
            if self.peak_flops:
                record["mfu"] = record["flops_model"] / seconds / self.peak_flops
            if images:
                record["images_per_s"] = images / seconds
            record["device_peak_bytes_so_far"] = device_peak()
        self.records[name] = record
        print(f"  {name}: " + row_text(name, record), flush=True)
        return record


# --- HLO statistics ----------------------------------------------------------------------------

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-_]*)\(")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
HOST_OPCODES = ("send", "recv", "send-done", "recv-done", "infeed", "outfeed")
HOST_TARGETS = re.compile(r"callback|python|host", re.IGNORECASE)
ATTRIBUTED = ("gather", "scatter", "while", "sort", "custom-call", "conditional", "transpose",
              "copy")
WATCHED = ("fusion", "copy", "transpose", "while", "conditional", "call", "custom-call", "gather",
           "scatter", "dot", "convolution", "sort", "reduce", "rng-bit-generator")


def _source_tables(text: str):
    """stack_frame_id -> 'file.py:line' of the innermost frame in this project (or any)."""
    tables, section = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {},
                       "StackFrames": {}}, None
    for line in text.splitlines():
        if line.strip() in tables:
            section = line.strip()
            continue
        if section and not line.strip():
            section = None
            continue
        row = _TABLE_ROW.match(line) if section else None
        if row:
            value = row.group(2)
            tables[section][int(row.group(1))] = (value.strip('"') if value.startswith('"')
                                                  else dict((k, int(v)) for k, v in
                                                            _FIELD.findall(value)))
    files, locations, frames = (tables["FileNames"], tables["FileLocations"],
                                tables["StackFrames"])

    def where(frame_id: int) -> str:
        first, seen = None, set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location = locations.get(frames[frame_id].get("file_location_id"), {})
            name = files.get(location.get("file_name_id"), "?")
            text = f"{Path(name).name}:{location.get('line', '?')}"
            first = first or text
            if "spectralmoe_jax" in name or "scripts" in name:
                return text
            frame_id = frames[frame_id].get("parent_frame_id")
        return first or "?"

    return where


def hlo_stats(text: str) -> dict:
    """Counts in an optimized HLO module (`compiled.as_text()`).

    `kernels`: instructions of the entry computation and of control flow (while bodies and
    conditions, conditional branches, calls): what runs as separate kernels or loops, by
    opcode. `fused`: instructions inside fusions. Reducer computations (`to_apply` of reduce,
    scatter, sort) are not counted. Gathers, scatters, loops, sorts, transposes, copies and
    custom calls are attributed to the innermost project source line that emitted them.
    `host_transfers` lists whatever leaves the device: send/recv, infeed/outfeed, and custom
    calls whose target names a (Python) callback.
    """
    where = _source_tables(text)
    computations, current = {}, None
    references = {}  # computation -> how it is called
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                references[current] = "entry"
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        op = _opcode(instruction.group(1))
        computations[current].append((op, line))
        for kind, name in _CALLS.findall(line):
            if kind == "calls":
                references[name] = "fused"
            elif kind == "to_apply":
                references.setdefault(name, "call" if op == "call" else "applied")
            else:
                references.setdefault(name, "control")
        for branches in _BRANCHES.findall(line):
            for name in re.findall(r"%?([\w.\-]+)", branches):
                references.setdefault(name, "control")

    def kind_of(name):  # a computation called from inside a fusion is fused too
        return references.get(name, "control")

    kernels, fused, fusion_kinds, targets = Counter(), Counter(), Counter(), Counter()
    by_source: dict[str, Counter] = {}
    host = []
    for name, instructions in computations.items():
        kind = kind_of(name)
        if kind == "applied":
            continue
        for op, line in instructions:
            if op is None or op in ("parameter", "constant", "get-tuple-element", "tuple",
                                    "bitcast"):
                continue
            (fused if kind == "fused" else kernels)[op] += 1
            if op == "fusion":
                fusion_kinds[(re.search(r"kind=(\w+)", line) or [None, "?"])[1]] += 1
            if op == "custom-call":
                target = (_TARGET.search(line) or [None, "?"])[1]
                targets[target] += 1
                if HOST_TARGETS.search(target):
                    host.append(target)
            if op in HOST_OPCODES:
                host.append(op)
            if op in ATTRIBUTED:
                frame = _FRAME.search(line)
                source = where(int(frame.group(1))) if frame else "?"
                by_source.setdefault(op, Counter())[source] += 1
    return {
        "computations": len(computations),
        "kernels_total": sum(kernels.values()),
        "kernels": {op: kernels[op] for op in WATCHED if kernels[op]},
        "fused": {op: fused[op] for op in WATCHED if fused[op]},
        "fusion_kinds": dict(fusion_kinds),
        "custom_call_targets": dict(targets),
        "by_source": {op: dict(c.most_common(12)) for op, c in by_source.items()},
        "host_transfers": host,
        "text_chars": len(text),
    }


def _opcode(rest: str) -> str | None:
    """The opcode of an instruction's right-hand side: the first `name(` after its shape."""
    match = _OPCODE.search(rest)
    return match.group(1) if match else None


# --- the parts ---------------------------------------------------------------------------------

def part_matmul(b: Bench):
    """Peak matmul throughput in the compute dtype (float32 accumulation), as SPEC 4 measured."""
    dtype = jnp.dtype(b.config.model.dtype)
    n = b.args.matmul_size or (8192 if jax.default_backend() != "cpu" else 1024)
    x = b.array(jax.random.key(1), (n, n), dtype)
    y = b.array(jax.random.key(2), (n, n), dtype)
    # Several products per call so dispatch does not count; each one depends on the last.
    repeats = 8

    def chain(x, y):
        for _ in range(repeats):
            x = jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype) * 0.01
        return x

    record = b.measure("matmul_peak", chain, (x, y))
    record.update(n=n, dtype=str(dtype))
    if "median_ms" in record:
        b.peak_flops = repeats * 2 * n ** 3 / (record["median_ms"] / 1e3)
        record["peak_tflops"] = b.peak_flops / 1e12
        record["mfu"] = 1.0


def _vit_pass(b: Bench, name: str, module, images, hook_params=None):
    """Forward of a frozen ViT, or (hook_params given) forward + backward to a trainable term
    added to the patch tokens after every block, as a per-block adapter would take it (SPEC 4's
    measurement)."""
    graphdef, state = nnx.split(module)
    layers = tuple(i for i in b.config.model.feature_layers if i < module.config.depth)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images).layers[jnp.asarray(layers)]

    def loss(hook_params, state, images):
        def hook(index, tokens):
            return tokens + hook_params[index], None

        out = nnx.merge(graphdef, state)(images, hook=hook)
        return sum(jnp.mean(jnp.square(out.layers[i])) for i in layers)

    backward = hook_params is not None
    fn, args = (jax.grad(loss), (hook_params, state, images)) if backward else (
        forward, (state, images))
    analytic = vit_flops(module.config, images.shape[0], images.shape[1:3], backward=backward)
    record = b.measure(name, fn, args, images=images.shape[0], flops_analytic=analytic["total"])
    record.update(tokens=analytic["tokens"], attention=resolve_implementation(
        module.config.attention, module.config.dtype))


def part_vfm(b: Bench):
    vfm = b.model.vfm
    size, batch = b.args.size, b.args.batch
    images = b.array(jax.random.key(3), (batch, size, size, vfm.config.in_channels))
    _vit_pass(b, "vfm_forward", vfm, images)
    hook_params = b.array(jax.random.key(4), (vfm.config.depth, 1, 1, vfm.config.width))
    _vit_pass(b, "vfm_forward_backward", vfm, images, hook_params)


def part_attention(b: Bench):
    """The VFM's self-attention alone, [B, T, heads, head_dim] in the compute dtype, forward and
    forward + backward, once per `--attention-impls` kernel: issue 7 asks for the fastest."""
    c = b.model.vfm.config
    tokens = (b.args.size // c.patch_size) ** 2 + 1 + c.num_register_tokens
    shape = (b.args.batch, tokens, c.num_heads, c.width // c.num_heads)
    q, k, v, cotangent = (b.array(jax.random.key(i), shape, c.dtype) for i in range(4))
    forward_flops = 4.0 * math.prod(shape) * tokens  # q k^T and p v
    for implementation in b.args.attention_impls:
        def forward(q, k, v):
            return dot_product_attention(q, k, v, implementation=implementation)

        def backward(q, k, v, cotangent):
            _, pullback = jax.vjp(forward, q, k, v)
            return pullback(cotangent)

        for name, fn, args, flops in (("forward", forward, (q, k, v), forward_flops),
                                      ("forward_backward", backward, (q, k, v, cotangent),
                                       3 * forward_flops)):
            try:  # a kernel that refuses the shape is a finding, not the end of the part
                record = b.measure(f"attention_{implementation}_{name}", fn, args,
                                   flops_analytic=flops)
            except Exception as error:  # noqa: BLE001
                b.records[f"attention_{implementation}_{name}"] = {
                    "error": f"{type(error).__name__}: {str(error)[:300]}"}
                print(f"  attention {implementation} {name}: {type(error).__name__}", flush=True)
                continue
            record.update(shape=list(shape), implementation=implementation)


def part_depth(b: Bench):
    """The depth encoder as the segmentor runs it: band selection, all blocks, the token grid
    resized to the VFM's where the patch sizes differ, no gradient."""
    model = b.model
    if model.depth is None:
        print("  depth: no depth encoder in this config")
        return
    size, batch = b.args.size, b.args.batch
    images = b.array(jax.random.key(5), (batch, size, size, model.vfm.config.in_channels))
    graphdef, state = nnx.split(model)
    grid = (size // model.vfm.config.patch_size,) * 2

    def forward(state, images):
        return nnx.merge(graphdef, state).depth_features(images, grid)

    analytic = vit_flops(model.depth.config, batch, (size, size), backward=False)
    record = b.measure("depth_forward", forward, (state, images), images=batch,
                       flops_analytic=analytic["total"])
    record.update(tokens=analytic["tokens"], patch_size=model.depth.config.patch_size)


def part_adapter(b: Bench):
    model = b.model
    if model.adapter is None:
        print("  adapter: no adapter in this config")
        return
    size, batch = b.args.size, b.args.batch
    vfm, adapter = model.vfm, model.adapter
    grid = size // vfm.config.patch_size
    tokens = grid * grid
    # One layer next to one ViT block, forward and forward + backward (issue 4's figure); with
    # --compile-only its FLOPs and memory only.
    layer = load_script("bench_adapter").run(
        batch=batch, tokens=tokens, width=vfm.config.width, dtype=b.config.model.dtype,
        fusion=adapter.config.fusion, iters=b.args.steps, timed=not b.abstract)
    b.records["adapter_layer_vs_block"] = layer
    print("  adapter_layer_vs_block: " + ", ".join(
        f"{k} {v:.3g}" for k, v in layer.items() if k.endswith(("_ms", "_gflop", "_mb"))
        and v is not None), flush=True)

    # The VFM with the adapter after every block, forward + backward to the adapter.
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("adapter")),
                                       ...)
    images = b.array(jax.random.key(6), (batch, size, size, vfm.config.in_channels))
    # The depth tokens as the segmentor passes them: float32, every layer.
    depth = b.array(jax.random.key(7), (vfm.config.depth, batch, tokens, vfm.config.width))
    layers = tuple(b.config.model.feature_layers)

    def loss(params, rest, images, depth, rng):
        m = nnx.merge(graphdef, params, rest)

        def hook(index, patch_tokens):
            return m.adapter(index, patch_tokens, depth[index], train=True,
                             rng=jax.random.fold_in(rng, index))

        out = m.vfm(images, hook=hook)
        features = sum(jnp.mean(jnp.square(out.layers[i])) for i in layers)
        return features + jnp.mean(out.hook_aux["balance_loss"])

    rng = jax.random.key(8)
    b.measure("vfm_adapter_forward_backward", jax.grad(loss), (params, rest, images, depth, rng),
              images=batch)


def _features(b: Bench):
    """The pyramid the segmentor hands the decoder: float32 maps at strides 4, 8, 16, 32."""
    size, batch, width = b.args.size, b.args.batch, b.model.vfm.config.width
    keys = jax.random.split(jax.random.key(9), 4)
    return [b.array(k, (batch, size // s, size // s, width)) for k, s in zip(keys, (4, 8, 16, 32))]


def _sum_squares(tree):
    return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def part_decoder(b: Bench):
    head = b.model.head
    batch = b.args.batch
    features = _features(b)

    pd_def, pd_params, pd_rest = nnx.split(head.pixel_decoder, nnx.Param, ...)

    def pixel(params, features):
        return nnx.merge(pd_def, params, pd_rest)(features)

    b.measure("pixel_decoder_forward", pixel, (pd_params, features), images=batch)
    b.measure("pixel_decoder_forward_backward",
              jax.grad(lambda p, f: _sum_squares(pixel(p, f)), argnums=(0, 1)),
              (pd_params, features), images=batch)

    mask_features, multi_scale = jax.eval_shape(pixel, pd_params, features)
    mask_features = b.like(jax.random.key(10), mask_features)
    multi_scale = b.like(jax.random.key(11), multi_scale)
    c = head.config
    query = b.array(jax.random.key(12), (c.num_queries, c.hidden_dim))
    td_def, td_params, td_rest = nnx.split(head.transformer_decoder, nnx.Param, ...)

    def decoder(params, multi_scale, mask_features, query):
        return nnx.merge(td_def, params, td_rest)(multi_scale, mask_features, query)

    args = (td_params, multi_scale, mask_features, query)
    b.measure("transformer_decoder_forward", decoder, args, images=batch)
    b.measure("transformer_decoder_forward_backward",
              jax.grad(lambda *a: _sum_squares(decoder(*a)), argnums=(0, 1, 2, 3)), args,
              images=batch)


def part_loss(b: Bench):
    c = b.model.head.config
    batch, size = b.args.batch, b.args.size
    dtype = b.config.model.dtype
    layers = c.decoder_layers + 1
    k = b.config.data.num_classes
    class_logits = b.array(jax.random.key(13), (layers, batch, c.num_queries, k + 1), dtype)
    mask_logits = b.array(jax.random.key(14), (layers, batch, c.num_queries, size // 4, size // 4),
                          dtype)
    labels = b.labels(jax.random.key(15), batch, size)
    loss_config = loss_config_from(b.config)
    ignore = b.config.data.get("ignore_index", 255)
    rng = jax.random.key(16)

    def loss(class_logits, mask_logits, labels, rng):
        targets = semantic_to_targets(labels, k, ignore_index=ignore)
        outputs = {"class_logits": class_logits, "mask_logits": mask_logits}
        return mask2former_loss(outputs, targets, rng, loss_config)[0]

    b.measure("loss_forward_backward", jax.value_and_grad(loss, argnums=(0, 1)),
              (class_logits, mask_logits, labels, rng), images=batch)

    def matching(class_logits, mask_logits, labels, rng):
        targets = semantic_to_targets(labels, k, ignore_index=ignore)
        draws = sample_point_draws(rng, layers, batch, k, loss_config)
        per_image = jax.vmap(lambda cl, ml, t, coords: match_queries(cl, ml, t, coords,
                                                                     loss_config))
        return jax.vmap(per_image, in_axes=(0, 0, None, 0))(
            class_logits, mask_logits, targets, draws["matcher_coords"])

    b.measure("matcher_forward", matching, (class_logits, mask_logits, labels, rng), images=batch)


def _optimizer(b: Bench, params):
    return make_optimizer(b.config.train, params)[0]


def part_optimizer(b: Bench):
    import optax

    _, params, _, _ = split_model(b.model)
    tx = _optimizer(b, params)
    opt_state = jax.eval_shape(tx.init, params) if b.abstract else tx.init(params)
    grads = b.like(jax.random.key(17), params)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    record = b.measure("optimizer_update", update, (params, opt_state, grads))
    record["trainable_parameters"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _train_step(b: Bench, batch_size: int):
    graphdef, params, frozen, rest = split_model(b.model)
    tx = _optimizer(b, params)
    init = lambda p: init_train_state(p, tx, b.config.seed)  # noqa: E731
    # A copy: the step donates its state, and the model's own arrays serve the other parts.
    state = jax.eval_shape(init, params) if b.abstract else init(jax.tree.map(jnp.copy, params))
    step = make_train_step(graphdef, tx, num_classes=b.config.data.num_classes,
                           loss_config=loss_config_from(b.config),
                           ignore_index=b.config.data.get("ignore_index", 255))
    size = b.args.size
    batch = {"image": b.array(jax.random.key(18), (batch_size, size, size,
                                                    b.model.vfm.config.in_channels)),
             "label": b.labels(jax.random.key(19), batch_size, size)}
    return step, (state, frozen, rest, batch)


def part_step(b: Bench):
    step, args = _train_step(b, b.args.batch)
    record = b.measure("train_step", step, args, donate=(0,), carry=True, images=b.args.batch,
                       hlo=True)
    analytic = vit_flops(b.model.vfm.config, b.args.batch, (b.args.size,) * 2, backward=True)
    if b.model.depth is not None:
        depth = vit_flops(b.model.depth.config, b.args.batch, (b.args.size,) * 2, backward=False)
        record["flops_analytic_depth_forward"] = depth["total"]
    record["flops_analytic_vfm_forward_backward"] = analytic["total"]


def part_fit(b: Bench):
    """Compile only: does the train step at --fit-batch fit the device?"""
    step, args = _train_step(b, b.args.fit_batch)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    jitted = jax.jit(step, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    record = {"batch": b.args.fit_batch, "compile_s": time.perf_counter() - start,
              "memory": memory(compiled), **cost(compiled)}
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        record["device_bytes_limit"] = limit
        record["fits"] = record["memory"].get("peak_bytes", 0) <= limit
    b.records[f"train_step_fit_batch{b.args.fit_batch}"] = record
    print(f"  fit batch {b.args.fit_batch}: peak "
          f"{record['memory'].get('peak_bytes', 0) / 2**30:.1f} GiB"
          + (f" of {limit / 2**30:.1f} GiB" if limit else ""), flush=True)


def part_eval(b: Bench):
    """The evaluation runner's compiled inference (config.eval: whole image) on a batch."""
    graphdef, state = nnx.split(b.model)
    size, batch = b.args.size, b.args.batch
    images = b.array(jax.random.key(20), (batch, size, size, b.model.vfm.config.in_channels))
    infer = make_model_infer(graphdef, b.config.eval, patch_multiple(b.model))
    b.measure("eval_forward", infer, (state, images), images=batch)


def part_backbones(b: Bench):
    if b.abstract:
        return
    presets = b.args.backbones or ("dinov3_vitl16", "dinov2_vitl14", "dofa_vitl16")
    result = load_script("bench_backbone").run(
        batch=b.args.batch, size=b.args.size, dtype=b.config.model.dtype, variants=tuple(presets),
        iters=b.args.steps, warmup=b.args.warmup)
    b.records["backbones"] = result
    for name in presets:
        print(f"  backbone {name}: {result[name]['forward_ms']:.2f} ms, "
              f"compile {result[name]['compile_s']:.1f} s", flush=True)


def part_input(b: Bench):
    if b.abstract:
        return
    result = load_script("bench_input").run(
        num_tiles=b.args.input_tiles, bands=b.model.vfm.config.in_channels, size=b.args.size,
        batch_size=b.args.batch, workers=tuple(b.args.input_workers),
        batches=b.args.input_batches)
    b.records["input_pipeline"] = result
    print(f"  input pipeline: {result['measured_tiles_per_s']} tiles/s, per tile "
          f"{result['per_tile']}", flush=True)


PARTS = {"matmul": part_matmul, "attention": part_attention, "vfm": part_vfm, "depth": part_depth, "adapter": part_adapter,
         "decoder": part_decoder, "loss": part_loss, "optimizer": part_optimizer,
         "step": part_step, "eval": part_eval, "input": part_input,
         "backbones": part_backbones, "fit": part_fit}


# --- report ------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_text(name: str, r: dict) -> str:
    mem = r.get("memory", {}).get("peak_bytes")
    return (f"{_fmt(r.get('median_ms'), '9.2f')} ms  compile {_fmt(r.get('compile_s'), '6.1f')} s  "
            f"{_fmt(r.get('flops_model', 0) / 1e9, '10.1f')} GFLOP  "
            f"{_fmt(r.get('tflops_per_s'), '7.2f')} TFLOP/s  MFU {_fmt(r.get('mfu'), '6.1%')}  "
            f"XLA peak {_fmt(mem and mem / 2**20, '9.0f')} MiB")


def table(records: dict) -> str:
    lines = [f"{'part':38s} {'median ms':>10s} {'compile s':>9s} {'GFLOP':>10s} "
             f"{'TFLOP/s':>8s} {'MFU':>6s} {'img/s':>7s} {'XLA peak MiB':>12s}"]
    for name, r in records.items():
        if "compile_s" not in r or "memory" not in r:
            continue
        mem = r["memory"].get("peak_bytes")
        lines.append(
            f"{name:38s} {_fmt(r.get('median_ms'), '10.2f')} {r['compile_s']:9.1f} "
            f"{r.get('flops_model', r.get('flops_xla', 0)) / 1e9:10.1f} "
            f"{_fmt(r.get('tflops_per_s'), '8.2f')} {_fmt(r.get('mfu'), '6.1%')} "
            f"{_fmt(r.get('images_per_s'), '7.1f')} {_fmt(mem and mem / 2**20, '12.0f')}")
    return "\n".join(lines)


def profile(records: dict) -> dict:
    """The step's time split into parts measured separately (they need not add up exactly:
    XLA fuses across part boundaries in the step)."""
    ms = {name: r["median_ms"] for name, r in records.items() if "median_ms" in r}
    if "train_step" not in ms:
        return {}
    shares = {
        "vfm_forward_backward": ms.get("vfm_forward_backward"),
        "depth_forward": ms.get("depth_forward"),
        "adapter_all_layers_forward_backward": (
            ms["vfm_adapter_forward_backward"] - ms["vfm_forward_backward"]
            if "vfm_adapter_forward_backward" in ms and "vfm_forward_backward" in ms else None),
        "pixel_decoder_forward_backward": ms.get("pixel_decoder_forward_backward"),
        "transformer_decoder_forward_backward": ms.get("transformer_decoder_forward_backward"),
        "loss_forward_backward": ms.get("loss_forward_backward"),
        "optimizer_update": ms.get("optimizer_update"),
    }
    step = ms["train_step"]
    known = {k: v for k, v in shares.items() if v is not None}
    return {"train_step_ms": step,
            "parts_ms": known,
            "parts_share": {k: v / step for k, v in known.items()},
            "sum_of_parts_ms": sum(known.values())}


def metadata(args, config) -> dict:
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "config": args.config + (" (--tiny)" if args.tiny else ""),
        "batch": args.batch,
        "size": args.size,
        "dtype": str(config.model.dtype),
        "attention": config.model.vfm.overrides.get("attention", "auto"),
        "remat": config.model.vfm.overrides.get("remat", "none"),
        "compile_only": args.compile_only,
        "steps": args.steps,
        "warmup": args.warmup,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/flair.py", help="configs/NAME.py[:variant]")
    parser.add_argument("--tiny", action="store_true",
                        help="configs/demo.py at its own crop and batch: a CPU run of minutes")
    parser.add_argument("--batch", type=int, help="default: config.train.batch_size")
    parser.add_argument("--size", type=int, help="square crop; default: config.data.crop_size")
    parser.add_argument("--parts", nargs="+", default=["all"],
                        help=f"'all' or any of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, help="timed runs per part (20; 5 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (3; 1 with --tiny)")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn", "pallas"),
                        help="override both ViTs' attention implementation")
    parser.add_argument("--attention-impls", nargs="+", choices=("xla", "cudnn", "pallas"),
                        help="kernels the 'attention' part compares (xla cudnn pallas on a GPU)")
    parser.add_argument("--remat", choices=("none", "dots", "full"),
                        help="override the VFM blocks' remat policy (ViTConfig.remat)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="override model.dtype")
    parser.add_argument("--compile-only", action="store_true",
                        help="lower and compile on abstract inputs; no weights, no timing")
    parser.add_argument("--hlo", action="store_true", help="HLO statistics of every part")
    parser.add_argument("--dump-hlo", help="folder for the optimized HLO text of those parts")
    parser.add_argument("--fit-batch", type=int, default=16)
    parser.add_argument("--matmul-size", type=int, help="default 8192 (1024 on a CPU)")
    parser.add_argument("--backbones", nargs="+", help="presets for the 'backbones' part")
    parser.add_argument("--input-tiles", type=int, default=32)
    parser.add_argument("--input-batches", type=int, default=4)
    parser.add_argument("--input-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", help="JSON file (rewritten after every part)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.config = "configs/demo.py"
    args.steps = args.steps or (5 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    parts = []
    for name in args.parts:
        parts.extend(DEFAULT_PARTS if name == "all" else [name])
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)} or 'all'")
    args.parts = list(dict.fromkeys(parts))
    return args


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config)
    args.batch = args.batch or config.train.batch_size
    args.size = args.size or config.data.crop_size[0]
    if args.dtype:
        config.model.dtype = args.dtype
    if args.attention:
        for name in ("vfm", "depth"):
            config.model[name].overrides["attention"] = args.attention
    if args.remat:
        config.model.vfm.overrides["remat"] = args.remat
    args.attention_impls = args.attention_impls or (
        ["xla", "cudnn", "pallas"] if jax.default_backend() == "gpu" else ["xla"])
    meta = metadata(args, config)
    print(json.dumps(meta, indent=1), flush=True)

    build = lambda: Segmentor(config.model, rngs=nnx.Rngs(config.seed))  # noqa: E731
    start = time.perf_counter()
    # Random weights (no checkpoint is read); shapes only when nothing runs.
    model = nnx.eval_shape(build) if args.compile_only else build()
    meta["build_s"] = time.perf_counter() - start
    bench = Bench(args, config, model)
    result = {"meta": meta, "parts": bench.records}

    def write():
        result["profile"] = profile(bench.records)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    for name in args.parts:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            PARTS[name](bench)
        except Exception as error:  # one failing part (a missing package, memory) ends only itself
            traceback.print_exc()
            meta.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        meta.setdefault("part_wall_s", {})[name] = round(time.perf_counter() - start, 1)
        write()
    print(table(bench.records))
    if result["profile"]:
        print(json.dumps(result["profile"], indent=1))


if __name__ == "__main__":
    main()
