r"""The GPU and TPU programs, compiled ahead of time on a machine without them (issue 20).

  # in a venv with jax[cuda12] (docs/benchmarks.md, "Compile-time figures")
  python scripts/aot_check.py --target h100 --config configs/flair.py --batch 8 --parts step
  python scripts/aot_check.py --target h200 --batch 16 24 32 --remat dots --parts step eval
  # in a venv with jax[tpu]: a data-parallel ViT-L step over 8 v5e chips, per-chip batch 2
  python scripts/aot_check.py --target v5e-8 --batch 16 --parts step
  # the 7B VFM, its frozen weights FSDP-sharded over a v5p slice
  python scripts/aot_check.py --target v5p-16 --vfm dinov3_vit7b16 --mesh-model 8 --fsdp ...

It compiles the same programs `scripts/benchmark.py` times (the parts of scripts/bench/), for
the target's devices: a GPU from its description (SPEC section 5.4: a GpuTargetConfigProto and
`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`), TPU slices from libtpu's topologies. The batch is split
over the mesh's 'data' axis (`--batch` is global), frozen weights are replicated or, with
`--fsdp`, sharded over 'model'. Per program and per device it records the argument, output,
temporary and peak bytes and whether they fit the device, the kernels of the optimized HLO
(fusions, custom calls, cuDNN attention calls, copies and transposes in and outside fusions,
what they read and where they run), the collectives, the largest buffers by name, FLOPs and
the compile time; JSON (`--out`, rewritten after every program) plus a table.

These are compile-time figures: what the hardware would run and hold, not how fast. XLA cannot
autotune without the device (`--xla_gpu_autotune_level=0`) and Triton GEMM fusions are off (a
deviceless compile finds no tile sizes for some, "Couldn't find output tile sizes"), so the
real program may pick other kernels. Nothing runs; weights are shapes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before jax is imported: what a deviceless GPU compile needs, and the buffer-assignment dumps.
DUMP_DIR = tempfile.mkdtemp(prefix="aot_check_dump_")
GPU_FLAGS = ("--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0 "
             "--xla_gpu_shard_autotuning=false --xla_gpu_dump_llvmir=false")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Target:
    """A device type to compile for."""

    name: str
    platform: str  # 'cuda' | 'tpu'
    topology: str  # get_topology_desc's topology string
    memory_bytes: int  # per device
    memory_note: str  # where the figure comes from
    usable_fraction: float = 1.0  # of memory_bytes a run may take
    gpu_description: str | None = None  # GpuTargetConfigProto text (GPUs)


# SPEC section 5.4's H100 description (verified with jax 0.10.2); H200: the same chip (compute
# capability 9.0, 132 SMs) with 141 GB of HBM3e at 4.8 TB/s.
_GPU = ("gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 "
        "shared_memory_per_block: 49152 shared_memory_per_core: 233472 "
        "threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
        "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        "memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: 1.98 "
        "device_memory_size: {memory} shared_memory_per_block_optin: 232448 "
        "cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 "
        "registers_per_block_limit: 65536 }} runtime_version {{ major: 12 minor: 8 }} "
        'platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 7 }} '
        'device_description_str: "{description}"')
H100_MEMORY = 84_929_347_584  # what the CUDA runtime reports for an H100 80GB HBM3 (SPEC 5.4)
H200_MEMORY = 143_771 * 2**20  # nvidia-smi's 143771 MiB on the lent H200 (device KINDS.md)
# The GPU runs take this fraction of the card (XLA_PYTHON_CLIENT_MEM_FRACTION in gpu_check.sh).
GPU_FRACTION = 0.95


def _gpu(name, memory, bandwidth, l2, description, note, count=1):
    return Target(name, "cuda", f"1x1x{count}", memory, note, GPU_FRACTION,
                  _GPU.format(memory=memory, bandwidth=bandwidth, l2=l2,
                              description=description))


def _tpu(name, topology, memory, note):
    return Target(name, "tpu", topology, memory, note)


V5E_HBM = 16 * 2**30  # per chip (Cloud TPU v5e: 16 GiB HBM2)
V5P_HBM = 95 * 2**30  # per chip (Cloud TPU v5p: 95 GiB HBM2e)
TARGETS = {
    "h100": _gpu("h100", H100_MEMORY, 3_352_320_000_000, 52_428_800, "NVIDIA H100 80GB HBM3",
                 "CUDA runtime total of an H100 80GB HBM3"),
    "h200": _gpu("h200", H200_MEMORY, 4_800_000_000_000, 62_914_560, "NVIDIA H200",
                 "nvidia-smi total of the lent H200 (143771 MiB)"),
    # Cloud TPU names count TensorCores for v5p (2 per chip) and chips for v5e.
    "v5e-4": _tpu("v5e-4", "v5e:2x2", V5E_HBM, "16 GiB HBM2 per v5e chip"),
    "v5e-8": _tpu("v5e-8", "v5e:2x4", V5E_HBM, "16 GiB HBM2 per v5e chip"),
    "v5p-8": _tpu("v5p-8", "v5p:2x2x1", V5P_HBM, "95 GiB HBM2e per v5p chip"),
    "v5p-16": _tpu("v5p-16", "v5p:2x2x2", V5P_HBM, "95 GiB HBM2e per v5p chip"),
    "v5p-32": _tpu("v5p-32", "v5p:2x2x4", V5P_HBM, "95 GiB HBM2e per v5p chip"),
}
for _count in (2, 4, 8):
    for _base in ("h100", "h200"):
        TARGETS[f"{_base}x{_count}"] = dataclasses.replace(
            TARGETS[_base], name=f"{_base}x{_count}", topology=f"1x1x{_count}")


def parse_args(argv=None):
    import benchmark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=sorted(TARGETS))
    benchmark.add_model_args(parser, batches=True)
    parser.add_argument("--parts", nargs="+", default=["step"],
                        help="any of the jitted parts of scripts/benchmark.py (not 'input')")
    parser.add_argument("--mesh-model", type=int, default=1,
                        help="devices per model group; the rest is the 'data' axis")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the frozen backbones over 'model' (largest divisible axis)")
    parser.add_argument("--buffers", type=int, default=12, help="largest buffers to name")
    parser.add_argument("--dump-hlo", help="folder for each program's optimized HLO text")
    parser.add_argument("--out", help="JSON file (rewritten after every program)")
    args = parser.parse_args(argv)
    args.parts = benchmark.expand_parts(parser, args.parts, ("step",))
    if "input" in args.parts:
        parser.error("'input' runs no jitted program: time it with scripts/benchmark.py")
    return args


def target_devices(target: Target):
    from jax.experimental import topologies

    if target.platform == "cuda":
        topology = topologies.get_topology_desc(target.name, "cuda",
                                                target_config=target.gpu_description,
                                                topology=target.topology)
    else:
        topology = topologies.get_topology_desc(target.topology, platform="tpu")
    return topology.devices


def make_mesh(devices, model: int):
    import jax
    from jax.sharding import AxisType

    if len(devices) % model:
        raise SystemExit(f"--mesh-model {model} does not divide the {len(devices)} devices")
    data = len(devices) // model
    # Auto axes as spectralmoe_jax/sharding.py: shardings are given at the jit boundary.
    return jax.sharding.Mesh(np.asarray(devices).reshape(data, model), ("data", "model"),
                             axis_types=(AxisType.Auto, AxisType.Auto))


def shardings(program, mesh, fsdp: bool):
    """Per argument, the trainer's layout (bench.program): the batch axis over 'data', frozen
    weights replicated or FSDP over 'model', the rest replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bench.program import FROZEN, REPLICATED

    replicated = NamedSharding(mesh, P())
    data = mesh.shape["data"]

    def one(leaf, layout):
        if layout == REPLICATED or not hasattr(leaf, "shape"):
            return replicated
        if layout == FROZEN:
            return largest_axis_sharding(mesh, leaf) if fsdp else replicated
        if leaf.ndim > layout and leaf.shape[layout] % data == 0:
            spec = [None] * leaf.ndim
            spec[layout] = "data"
            return NamedSharding(mesh, P(*spec))
        return replicated

    return tuple(jax.tree.map(lambda leaf, layout=program.argument_layout(i): one(leaf, layout),
                              arg) for i, arg in enumerate(program.args))


def largest_axis_sharding(mesh, array):
    """FSDP as this script approximates it (the programs' frozen arguments may be per-layer
    slices without their logical names): the largest axis the 'model' size divides, small
    arrays replicated. Training places weights by the rule table (spectralmoe_jax/sharding.py)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    size = mesh.shape["model"]
    if size == 1 or array.ndim == 0 or int(np.prod(array.shape)) < 2**16:
        return NamedSharding(mesh, P())
    for axis in np.argsort(array.shape)[::-1]:
        if array.shape[axis] % size == 0:
            spec = [None] * array.ndim
            spec[axis] = "model"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def abstract(tree, shardings_tree):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings_tree)


def check(program, target: Target, mesh, args) -> dict:
    """Compiles one program for the mesh; the record of its memory, kernels and buffers."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bench.hlo import hlo_stats, largest_buffers
    from bench.measure import compile_program

    in_shardings = shardings(program, mesh, args.fsdp)
    program = dataclasses.replace(program, args=tuple(
        abstract(a, s) for a, s in zip(program.args, in_shardings)))
    out_shardings = None
    if program.replicated_outputs:
        outputs = jax.eval_shape(program.fn, *program.args)
        out_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), outputs)
    for path in glob.glob(os.path.join(DUMP_DIR, "*")):
        os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)
    with jax.set_mesh(mesh):  # programs that need the mesh itself (shard_map) read it here
        compiled, record = compile_program(program, in_shardings=in_shardings,
                                           out_shardings=out_shardings)
    text = compiled.as_text()
    record["hlo"] = hlo_stats(text)
    assignment = sorted(glob.glob(os.path.join(DUMP_DIR, "*buffer-assignment.txt")),
                        key=os.path.getsize)
    if assignment:  # the module's own (the largest), not a small helper compiled beside it
        record["largest_buffers"] = largest_buffers(Path(assignment[-1]).read_text(), text,
                                                    args.buffers)
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        Path(args.dump_hlo, f"{target.name}_{program.name}.hlo.txt").write_text(text)
    usable = int(target.memory_bytes * target.usable_fraction)
    peak = record["memory"].get("peak_bytes", 0)
    record.update(device_memory_bytes=target.memory_bytes, usable_bytes=usable,
                  fits=peak <= usable, memory_share=peak / target.memory_bytes)
    return record


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:44s} ERROR {r['error'][:100]}"
    m, h = r["memory"], r["hlo"]
    gib = lambda b: b / 2**30  # noqa: E731
    return (f"{name:44s} {gib(m['argument_bytes']):7.2f} {gib(m['output_bytes']):7.2f} "
            f"{gib(m['temp_bytes']):7.2f} {gib(m['peak_bytes']):7.2f} "
            f"{'yes' if r['fits'] else 'NO':>4s} {h['kernels'].get('fusion', 0):6d} "
            f"{h['kernels'].get('custom-call', 0):5d} {h['cudnn_attention_calls']:4d} "
            f"{h['copies']:5d} {h['transposes']:5d} {sum(h['collectives'].values()):5d} "
            f"{r['flops_model'] / 1e12:8.3f} {r['compile_s']:7.1f}")


HEADER = (f"{'program (per device, GiB)':44s} {'args':>7s} {'outs':>7s} {'temp':>7s} "
          f"{'peak':>7s} {'fits':>4s} {'fusion':>6s} {'cc':>5s} {'fmha':>4s} {'copy':>5s} "
          f"{'trans':>5s} {'coll':>5s} {'TFLOP':>8s} {'comp s':>7s}")


def main(argv=None):
    # The target decides the XLA flags, which must be set before the first compile.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--target", choices=sorted(TARGETS))
    target = TARGETS.get(pre.parse_known_args(argv)[0].target)
    if target is None:
        parse_args(argv)  # the full usage message
        return
    if target.platform == "cuda":
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS", ""), GPU_FLAGS,
            f"--xla_dump_to={DUMP_DIR} --xla_dump_hlo_module_re=^jit_ --xla_dump_hlo_as_text"]))
    else:
        # Several compiles may hold libtpu at once (no chip is opened).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS", ""),
            f"--xla_dump_to={DUMP_DIR} --xla_dump_hlo_module_re=^jit_ --xla_dump_hlo_as_text"]))
    # The compile runs on this machine's CPU; the CPU backend only hosts the tracing.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = parse_args(argv)

    import bench
    import benchmark

    devices = target_devices(target)
    mesh = make_mesh(devices, args.mesh_model)
    # 'auto' picks its kernel from the local backend (the CPU here): choose the target's own.
    # cuDNN flash attention on a GPU is what 'auto' runs there; XLA's on a TPU.
    if not args.attention:
        args.attention = "cudnn" if target.platform == "cuda" else "xla"
    if not args.decoder_attention:  # the same for the decoder's 'auto'
        args.decoder_attention = "cudnn" if target.platform == "cuda" else "xla"
    batches = args.batch or [None]  # None: the config's batch
    meta = {"target": dataclasses.asdict(target) | {"gpu_description": None},
            "devices": len(devices), "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape), "fsdp": args.fsdp,
            "xla_flags": os.environ["XLA_FLAGS"].replace(DUMP_DIR, "<dump>"),
            "note": "compile-time figures: no timing, no autotuning"}
    records: dict = {}
    result = {"meta": meta, "programs": records}
    print(HEADER, flush=True)
    for batch in batches:
        run_args = argparse.Namespace(**vars(args) | {"batch": batch})
        ctx, _ = benchmark.make_context(run_args, abstract=True,
                                        default_attention_impls=[args.attention])
        batch = ctx.batch
        if not records:
            meta.update(benchmark.metadata(run_args, ctx.config), target_name=target.name)
        for name in args.parts:
            programs = bench.programs_of(name, ctx)
            for program in programs or ():
                key = f"{program.name}@batch{batch}" if len(batches) > 1 else program.name
                try:
                    records[key] = check(program, target, mesh, args)
                except Exception as error:  # noqa: BLE001 - a refusal is a finding
                    records[key] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
                    if "RESOURCE_EXHAUSTED" in str(error):  # the TPU compiler's own verdict
                        records[key]["fits"] = False
                records[key].setdefault("batch", batch)
                print(row(key, records[key]), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(DUMP_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
