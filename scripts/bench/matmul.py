"""The matmul peak that MFU is measured against: chained square products in the compute dtype
(float32 accumulation), as SPEC section 4 measured it (651-666 TFLOP/s bf16 on one H100)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.program import Context, Program

REPEATS = 8  # products per call, each depending on the last, so dispatch does not count


def programs(ctx: Context):
    n = ctx.options.matmul_size or (8192 if jax.default_backend() != "cpu" else 1024)
    dtype = ctx.dtype
    x = ctx.array(jax.random.key(1), (n, n), dtype)
    y = ctx.array(jax.random.key(2), (n, n), dtype)

    def chain(x, y):
        for _ in range(REPEATS):
            x = jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype) * 0.01
        return x

    yield Program("matmul_peak", chain, (x, y), info=dict(n=n, dtype=str(dtype)))


def peak_flops(record: dict) -> float | None:
    """FLOP/s of the measured chain, or None when it did not run."""
    if "median_ms" not in record:
        return None
    return REPEATS * 2 * record["n"] ** 3 / (record["median_ms"] / 1e3)
