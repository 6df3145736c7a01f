"""Backbone benchmark: forward time, compile time and peak memory of the frozen ViTs.

SPEC section 4's reference (one H100, bf16, batch 8, 512x512, ViT-L): PyTorch 14.1 ms,
JAX with cuDNN attention on padded tokens 14.2 ms, JAX with XLA attention 30.4 ms.

  python scripts/bench_backbone.py                               # the ViT-Ls at 512, batch 8, bf16
  python scripts/bench_backbone.py --batch 1 --size 224 --variants dinov3_vits16   # CPU check

Weights are random (timing does not depend on them). DOFA gets 32 bands (WHU-OHS wavelengths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __package__ in (None, ""):  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralmoe_jax.models.vit import VisionTransformer, vit_config

DECODER_LAYERS = (7, 11, 15, 23)  # the blocks the Mask2Former pyramid takes


def _forward_fn(graphdef, wavelengths):
    @jax.jit
    def forward(state, images):
        out = nnx.merge(graphdef, state)(images, wavelengths=wavelengths)
        layers = [i for i in DECODER_LAYERS if i < out.layers.shape[0]]
        return out.layers[jnp.asarray(layers)], out.normed

    return forward


def _memory(compiled) -> dict:
    stats = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes"):
            stats[field] = getattr(analysis, field, None)
        stats["compiled_peak_bytes"] = (analysis.argument_size_in_bytes
                                        + analysis.output_size_in_bytes
                                        + analysis.temp_size_in_bytes
                                        - analysis.alias_size_in_bytes)
    device_stats = jax.devices()[0].memory_stats()
    if device_stats:
        stats["device_peak_bytes_in_use"] = device_stats.get("peak_bytes_in_use")
    return stats


def bench_variant(name: str, *, batch: int, size: int, dtype: str, attention: str | None,
                  iters: int, warmup: int) -> dict:
    config = vit_config(name, dtype=dtype, attention=attention)
    wavelengths = None
    channels = config.in_channels
    if config.family == "dofa":
        channels = 32
        wavelengths = jnp.asarray(np.linspace(0.466, 0.940, channels, dtype=np.float32))
    model = nnx.jit(lambda rngs: VisionTransformer(config, rngs=rngs))(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (batch, size, size, channels), jnp.float32)
    forward = _forward_fn(graphdef, wavelengths)

    start = time.perf_counter()
    compiled = forward.lower(state, images).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(state, images))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, images))
        times.append(time.perf_counter() - start)
    forward_ms = 1e3 * statistics.median(times)
    return {"forward_ms": forward_ms, "images_per_s": batch / forward_ms * 1e3,
            "compile_s": compile_s, "tokens": 1 + config.num_register_tokens
            + (size // config.patch_size) ** 2, **_memory(compiled)}


def run(batch: int = 8, size: int = 512, dtype: str = "bfloat16",
        variants=("dinov3_vitl16", "dinov2_vitl14", "dofa_vitl16"), *,
        attention: str | None = "auto", iters: int = 20, warmup: int = 3) -> dict:
    """{variant: {forward_ms (median of `iters`), compile_s, memory fields}} plus the setting."""
    results = {"device": str(jax.devices()[0]), "batch": batch, "size": size, "dtype": dtype,
               "attention": attention}
    for name in variants:
        results[name] = bench_variant(name, batch=batch, size=size, dtype=dtype,
                                      attention=attention, iters=iters, warmup=warmup)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", nargs="+",
                        default=["dinov3_vitl16", "dinov2_vitl14", "dofa_vitl16"])
    parser.add_argument("--attention", default="auto", help="xla | cudnn | auto")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    results = run(args.batch, args.size, args.dtype, tuple(args.variants),
                  attention=args.attention, iters=args.iters)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
