"""Time and memory of one SpectralMoE adapter layer next to one ViT-L block (issue 4).

Both are measured as they run in training: the frozen block's backward computes only the input
gradient; the adapter's backward computes its parameter gradients and its input gradient (earlier
adapters' updates flow through f_v). The goal is an adapter at most 15% of the block's time.

  python scripts/bench_adapter.py                                   # B 8, N 1024, d 1024, bf16
  python scripts/bench_adapter.py --batch 1 --tokens 64 --width 128 --dtype float32   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

if __package__ in (None, ""):  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE
from spectralmoe_jax.models.vit import Block, vit_config


def _time_ms(compiled, *args, iters: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def _stats(compiled) -> dict:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "temp_mb": None if memory is None else memory.temp_size_in_bytes / 2**20,
        "gflop": None if not cost or "flops" not in cost else cost["flops"] / 1e9,
    }


def run(batch: int = 8, tokens: int = 1024, width: int = 1024, dtype: str = "bfloat16",
        fusion: str = "attention", iters: int = 10, timed: bool = True) -> dict:
    """Median milliseconds, XLA temporary memory and FLOPs of block and adapter, fwd and fwd+bwd.

    `timed=False` only compiles (FLOPs and memory at full size on a CPU).
    """
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (batch, tokens, width), jnp.float32)  # residual stream
    f_d = jax.random.normal(keys[1], (batch, tokens, width), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(keys[2], (batch, tokens, width), jnp.float32)
    rng = keys[3]

    block_cfg = vit_config("dinov3_vitl16", width=width, num_heads=max(width // 64, 1),
                           mlp_dim=4 * width, depth=1, dtype=dtype)
    block_def, block_state = nnx.split(Block(block_cfg, rngs=nnx.Rngs(0)))
    adapter_cfg = AdapterConfig(width=width, fusion=fusion, dtype=dtype)
    adapter_def, adapter_state = nnx.split(SpectralMoE(adapter_cfg, rngs=nnx.Rngs(1)))
    # Released init has zero B and gates; random values make routing and experts non-trivial.
    leaves, treedef = jax.tree.flatten(adapter_state)
    adapter_state = jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, v.shape) for k, v in
                  zip(jax.random.split(rng, len(leaves)), leaves)])

    # Everything enters as an argument: closed-over arrays would be constant-folded by XLA.
    def block(state, x):
        return nnx.merge(block_def, state)(x, None, 0)

    def block_fwd_bwd(state, x, cotangent):
        y, vjp = jax.vjp(lambda x: block(state, x), x)  # frozen: input gradient only
        return y, vjp(cotangent)

    def adapter(state, x, f_d, rng):
        out, aux = nnx.merge(adapter_def, state)(jnp.int32(3), x, f_d, train=True, rng=rng)
        return out, aux["balance_loss"]

    def adapter_fwd_bwd(state, x, f_d, rng, cotangent):
        primal, vjp = jax.vjp(lambda state, x: adapter(state, x, f_d, rng), state, x)
        return primal, vjp((cotangent, jnp.ones((), jnp.float32)))

    result = {"device": jax.devices()[0].device_kind, "batch": batch, "tokens": tokens,
              "width": width, "dtype": dtype, "fusion": fusion}
    for name, fn, args in [
        ("block_fwd", block, (block_state, x)),
        ("block_fwd_bwd", block_fwd_bwd, (block_state, x, cotangent)),
        ("adapter_fwd", adapter, (adapter_state, x, f_d, rng)),
        ("adapter_fwd_bwd", adapter_fwd_bwd, (adapter_state, x, f_d, rng, cotangent)),
    ]:
        compiled = jax.jit(fn).lower(*args).compile()
        if timed:
            result[name + "_ms"] = _time_ms(compiled, *args, iters=iters)
        for key, value in _stats(compiled).items():
            result[f"{name}_{key}"] = value
    for unit in ("ms", "gflop"):
        if result.get(f"block_fwd_bwd_{unit}"):
            result[f"adapter_over_block_fwd_bwd_{unit}"] = (
                result[f"adapter_fwd_bwd_{unit}"] / result[f"block_fwd_bwd_{unit}"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fusion", default="attention", choices=("attention", "diagonal", "add"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile-only", action="store_true", help="FLOPs and memory, no timing")
    args = parser.parse_args()
    print(json.dumps(run(args.batch, args.tokens, args.width, args.dtype, args.fusion, args.iters,
                         timed=not args.compile_only), indent=2))


if __name__ == "__main__":
    main()
