r"""The training step and each of its parts: time, compile time, memory, FLOPs and MFU (issue 7).

  python scripts/benchmark.py --config configs/flair.py --batch 8 --size 512 --parts all \
      --steps 20 --out bench.json                # full ViT-L configuration, on a GPU
  python scripts/benchmark.py --tiny --out bench_tiny.json      # configs/demo.py, minutes on a CPU
  python scripts/benchmark.py --config configs/flair.py --parts step --compile-only --hlo \
      --out compile.json                         # FLOPs, memory and HLO statistics, nothing runs

The parts are the modules of scripts/bench/ (`bench.PARTS`; 'all' = every part but 'backbones'
and 'fit'); each builds its jitted programs and their arguments once, this harness compiles and
times them on the local device, and scripts/aot_check.py compiles the same programs for a GPU or
TPU that is not here. 'fit' compiles the train step at --fit-batch (16) for its memory only.

Every timed figure is the median of `--steps` runs after `--warmup` runs, each blocked until
ready. FLOPs: `flops_model` counts the matmuls and convolutions of the traced program
(`bench.flops.jaxpr_flops`: scan bodies times their length, cuDNN attention included);
`flops_xla` is XLA's cost analysis, which counts a loop body once (one ViT block of 24) and
elementwise work, kept for reference; `flops_analytic` is a closed form for the ViTs, a check of
the count. MFU = flops_model / median time / the measured matmul peak.
Weights are random: timing does not depend on them. The JSON is rewritten after every part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench/ package beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

import bench  # noqa: E402
from bench import matmul  # noqa: E402
from bench.measure import compile_program  # noqa: E402
from bench.program import Context, apply_overrides, build_segmentor, load_config  # noqa: E402
from spectralmoe_jax.run_config import parse  # noqa: E402


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


def measure(program, args, peak_flops: float | None) -> dict:
    """Compiles the program and, unless nothing runs, times it. A carried program's first
    output is its next first argument (the donated train state)."""
    compiled, record = compile_program(program, hlo=args.hlo or program.name == "train_step")
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        Path(args.dump_hlo, f"{program.name}.hlo.txt").write_text(compiled.as_text())
    if program.timed and not args.compile_only:
        state = list(program.args)

        def call():
            out = compiled(*state)
            if program.carry:
                state[0] = out[0]
            return out

        record.update(median_ms(call, args.steps, args.warmup))
        seconds = record["median_ms"] / 1e3
        record["tflops_per_s"] = record["flops_model"] / seconds / 1e12
        if peak_flops:
            record["mfu"] = record["flops_model"] / seconds / peak_flops
        if program.images:
            record["images_per_s"] = program.images / seconds
        record["device_peak_bytes_so_far"] = device_peak()
    if not program.timed:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit:
            record["device_bytes_limit"] = limit
            record["fits"] = record["memory"].get("peak_bytes", 0) <= limit
    return record


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
    if "adapter_layer_forward_backward" in ms and "block_forward_backward" in ms:
        ratio = ms["adapter_layer_forward_backward"] / ms["block_forward_backward"]
    else:
        ratio = None
    known = {k: v for k, v in shares.items() if v is not None}
    return {"train_step_ms": step,
            "parts_ms": known,
            "parts_share": {k: v / step for k, v in known.items()},
            "sum_of_parts_ms": sum(known.values()),
            "adapter_layer_over_block_forward_backward": ratio}


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
        "config": args.config + (" (--tiny)" if getattr(args, "tiny", False) else ""),
        "batch": args.batch,
        "size": args.size,
        "dtype": str(config.model.dtype),
        "attention": config.model.vfm.overrides.get("attention", "auto"),
        "decoder_attention": config.model.decoder.get("attention_implementation", "auto"),
        "remat": config.model.vfm.overrides.get("remat", "none"),
        "compile_only": getattr(args, "compile_only", True),
        "steps": getattr(args, "steps", None),
        "warmup": getattr(args, "warmup", None),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tiny", action="store_true",
                        help="configs/demo.py at its own crop and batch: a CPU run of minutes")
    parser.add_argument("--parts", nargs="+", default=["all"],
                        help=f"'all' or any of {', '.join(bench.ALL_PARTS)}")
    parser.add_argument("--steps", type=int, help="timed runs per part (20; 5 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (3; 1 with --tiny)")
    parser.add_argument("--compile-only", action="store_true",
                        help="lower and compile on abstract inputs; no weights, no timing")
    parser.add_argument("--hlo", action="store_true", help="HLO statistics of every part")
    parser.add_argument("--dump-hlo", help="folder for the optimized HLO text of those parts")
    parser.add_argument("--fit-batch", type=int, default=16)
    parser.add_argument("--out", help="JSON file (rewritten after every part)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.config = "configs/demo.py"
    args.steps = args.steps or (5 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.parts = expand_parts(parser, args.parts, bench.DEFAULT_PARTS)
    return args


def add_model_args(parser, batches: bool = False):
    """The options this harness shares with scripts/aot_check.py (`batches`: --batch takes a
    list, each compiled in turn)."""
    parser.add_argument("--config", default="configs/flair.py", help="configs/NAME.py[:variant]")
    parser.add_argument("--batch", type=int, nargs="+" if batches else None,
                        help="default: config.train.batch_size")
    parser.add_argument("--size", type=int, help="square crop; default: config.data.crop_size")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn", "pallas"),
                        help="override both ViTs' attention implementation")
    parser.add_argument("--attention-impls", nargs="+",
                        choices=("xla", "cudnn", "pallas", "splash", "splash128"),
                        help="kernels the 'attention' part compares (default: xla cudnn pallas "
                             "on a GPU; splash, splash128: TPU splash attention)")
    parser.add_argument("--decoder-attention", choices=("xla", "cudnn"),
                        help="the masked-attention decoder's attention implementation")
    parser.add_argument("--remat", choices=("none", "dots", "full"),
                        help="override the VFM blocks' remat policy (ViTConfig.remat)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="override model.dtype")
    parser.add_argument("--vfm", help="override the VFM preset (e.g. dinov3_vit7b16)")
    parser.add_argument("--eval-batch", type=int, help="the 'eval' part's batch (default --batch)")
    parser.add_argument("--matmul-size", type=int, help="default 8192 (1024 on a CPU)")
    parser.add_argument("--backbones", nargs="+", help="presets for the 'backbones' part")
    parser.add_argument("--input-tiles", type=int, default=32)
    parser.add_argument("--input-batches", type=int, default=4)
    parser.add_argument("--input-workers", type=int, nargs="+", default=[0, 2])


def expand_parts(parser, names, default):
    parts = []
    for name in names:
        parts.extend(default if name == "all" else [name])
    unknown = sorted(set(parts) - set(bench.ALL_PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {', '.join(bench.ALL_PARTS)} or 'all'")
    return list(dict.fromkeys(parts))


def make_context(args, *, abstract: bool, default_attention_impls=("xla",)):
    """The config with the command line's choices, the model, and the part options."""
    config = apply_overrides(load_config(args.config), dtype=args.dtype, attention=args.attention,
                             remat=args.remat, vfm=args.vfm,
                             decoder_attention=args.decoder_attention)
    run = parse(config)
    args.batch = args.batch or run.train.batch_size
    args.size = args.size or run.data.crop_size[0]
    args.attention_impls = args.attention_impls or list(default_attention_impls)
    start = time.perf_counter()
    model = build_segmentor(run, abstract)
    build_s = time.perf_counter() - start
    return Context(run, model, args.batch, args.size, abstract, args), build_s


def main(argv=None):
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    ctx, build_s = make_context(args, abstract=args.compile_only, default_attention_impls=(
        ("xla", "cudnn", "pallas") if on_gpu else ("xla",)))
    meta = dict(metadata(args, ctx.config), build_s=build_s)
    print(json.dumps(meta, indent=1), flush=True)
    records: dict = {}
    result = {"meta": meta, "parts": records}
    peak = None

    def write():
        result["profile"] = profile(records)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    for name in args.parts:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            programs = bench.programs_of(name, ctx)
            if programs is None:  # a part without a jitted program: runs only when timing
                if not args.compile_only:
                    records[name] = bench.PARTS[name].run_part(ctx)
                    print(f"  {name}: {json.dumps(records[name])}", flush=True)
            else:
                for program in programs:
                    try:  # a kernel that refuses a shape is a finding, not the end of the part
                        record = measure(program, args, peak)
                    except Exception as error:  # noqa: BLE001
                        traceback.print_exc()
                        records[program.name] = {"error": f"{type(error).__name__}: "
                                                          f"{str(error)[:300]}"}
                        continue
                    if program.name == "matmul_peak" and (peak := matmul.peak_flops(record)):
                        record.update(peak_tflops=peak / 1e12, mfu=1.0)
                    records[program.name] = record
                    print(f"  {program.name}: " + row_text(program.name, record), flush=True)
        except Exception as error:  # one failing part (a missing package, memory) ends only itself
            traceback.print_exc()
            meta.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        meta.setdefault("part_wall_s", {})[name] = round(time.perf_counter() - start, 1)
        write()
    print(table(records))
    if result["profile"]:
        print(json.dumps(result["profile"], indent=1))


if __name__ == "__main__":
    main()
