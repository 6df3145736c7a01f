"""Times the Mask2Former head (pixel decoder + masked-attention decoder), forward and forward +
backward, on random stride-4..32 features, and reports peak device memory.

  python scripts/bench_decoder.py                      # released size: 512x512, batch 8, bf16
  python scripts/bench_decoder.py --tiny --steps 2     # CPU smoke run

The backward pass differentiates a placeholder loss (mean square of all logits) with respect to
the head's parameters and the input features (the adapter trains through them). The loss with
its matching, and the head's parts separately, are timed by `scripts/benchmark.py`.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __package__ in (None, ""):  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralmoe_jax.models.mask2former import Mask2FormerConfig, Mask2FormerHead


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--size", type=int, default=512, help="image side; features at size/4..size/32"
    )
    parser.add_argument("--channels", type=int, default=1024, help="backbone width of every level")
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a small config for a CPU smoke run")
    return parser.parse_args()


def timed(fn, *args, steps):
    """(compile + first run seconds, median seconds per later run)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def run(batch: int = 8, size: int = 512, channels: int = 1024, classes: int = 24,
        dtype: str = "bfloat16", steps: int = 20, tiny: bool = False) -> dict:
    """Median ms of the head's forward and forward + backward, compile + first-run seconds, and
    the device's peak memory (where the backend reports it)."""
    dtype = jnp.dtype(dtype)
    if tiny:
        batch, size, channels = min(batch, 2), 64, 64
        config = Mask2FormerConfig(
            in_channels=(64,) * 4,
            num_classes=classes,
            hidden_dim=64,
            num_queries=16,
            encoder_layers=2,
            encoder_heads=4,
            decoder_layers=3,
            decoder_heads=4,
            dtype=dtype,
        )
    else:
        config = Mask2FormerConfig(in_channels=(channels,) * 4, num_classes=classes, dtype=dtype)

    head = Mask2FormerHead(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head, nnx.Param)
    keys = jax.random.split(jax.random.key(0), 5)
    features = [
        jax.random.normal(k, (batch, size // s, size // s, channels), dtype)
        for k, s in zip(keys, (4, 8, 16, 32))
    ]
    query_embedding = jax.random.normal(keys[4], (config.num_queries, config.hidden_dim))

    def forward(params, features, query_embedding):
        return nnx.merge(graphdef, params)(features, query_embedding)

    def placeholder_loss(params, features, query_embedding):
        out = forward(params, features, query_embedding)
        return sum(jnp.mean(jnp.square(v.astype(jnp.float32))) for v in out.values())

    forward_fn = jax.jit(forward)
    train_fn = jax.jit(jax.value_and_grad(placeholder_loss, argnums=(0, 1, 2)))

    device = jax.devices()[0]
    result = {"device": device.device_kind, "batch": batch, "size": size, "dtype": str(dtype),
              "num_queries": config.num_queries, "decoder_layers": config.decoder_layers}
    for name, fn in (("forward", forward_fn), ("forward_backward", train_fn)):
        first, per_step = timed(fn, params, features, query_embedding, steps=steps)
        result[f"{name}_ms"] = per_step * 1e3
        result[f"{name}_first_run_s"] = first
    stats = device.memory_stats() or {}
    result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return result


def main():
    args = parse_args()
    result = run(args.batch, args.size, args.channels, args.classes, args.dtype, args.steps,
                 args.tiny)
    print(
        f"device: {result['device']}; batch {result['batch']}, {result['size']}x{result['size']}, "
        f"{result['dtype']}, {result['num_queries']} queries, "
        f"{result['decoder_layers']} decoder layers"
    )
    for name in ("forward", "forward_backward"):
        print(
            f"{name:>17}: {result[name + '_ms']:8.2f} ms/step (median of {args.steps}; "
            f"compile + first run {result[name + '_first_run_s']:.1f} s)"
        )
    if result["peak_bytes_in_use"]:
        print(f"peak device memory: {result['peak_bytes_in_use'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
