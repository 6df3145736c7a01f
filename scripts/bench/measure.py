"""Compiling a `Program` and reading what the compiled program says about itself: FLOPs,
XLA's cost and memory analyses, and the kernels of its optimized HLO."""

from __future__ import annotations

import time

import jax

from bench.flops import jaxpr_flops, pallas_calls
from bench.hlo import hlo_stats
from bench.program import Program


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})
    return {"flops_xla": float(analysis.get("flops", 0.0)),
            "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


def memory(compiled) -> dict:
    """Per device: arguments, outputs, temporaries, and the peak they make together."""
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


def compile_program(program: Program, *, in_shardings=None, out_shardings=None,
                    hlo: bool = False):
    """(compiled, record): the program lowered and compiled on `args` (arrays or
    ShapeDtypeStructs, which may carry shardings for a target's devices)."""
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    jitted = jax.jit(program.fn, donate_argnums=program.donate, **kwargs)
    start = time.perf_counter()
    traced = jitted.trace(*program.args)
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    record = {"lower_s": lower_s, "compile_s": time.perf_counter() - start,
              "flops_model": jaxpr_flops(traced.jaxpr.jaxpr), **cost(compiled),
              "memory": memory(compiled), **program.info}
    if program.flops_analytic is not None:
        record["flops_analytic"] = program.flops_analytic
    if uncounted := pallas_calls(traced.jaxpr.jaxpr):
        record["pallas_calls_uncounted"] = uncounted
        if program.flops_analytic is not None:  # the closed form does see inside the kernels
            record["flops_model"] = program.flops_analytic
    if hlo:
        record["hlo"] = hlo_stats(compiled.as_text())
    return compiled, record
