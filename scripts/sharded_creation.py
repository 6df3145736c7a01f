r"""Memory of creating a model sharded over devices: every parameter born in its shard.

  # XLA's per-device figures for the 7B preset over 8 devices, compile only (no memory used)
  python scripts/sharded_creation.py --preset dinov3_vit7b16 --devices 8 --compile-only
  # measured: the process's peak resident memory, the 7B at 1 of its 40 blocks
  python scripts/sharded_creation.py --preset dinov3_vit7b16 --depth 1 --devices 8
  # the whole segmentor of configs/flair.py around that VFM, as `build.build_segmentor` makes it
  python scripts/sharded_creation.py --part segmentor --compile-only

Creation as the composition root does it: the model built abstractly, then one jitted
initialiser whose outputs land in the shardings of `--strategy` (default fsdp over all devices),
the layers made one after another under a scan. Simulated CPU devices share the host's memory,
so the measured peak (VmHWM above the resident memory once compiled) is the whole model plus
what the initialiser holds at once, every replicated parameter counted once per device; XLA's
memory analysis predicts it (`host_predicted_gib`: devices x (output + temporaries)). Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def memory_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/self/status")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dinov3_vit7b16")
    parser.add_argument("--depth", type=int, default=None, help="VFM blocks (default: the preset's)")
    parser.add_argument("--part", default="vfm", choices=("vfm", "segmentor"),
                        help="the VFM alone, or the segmentor (VFM, depth ViT, adapter, head)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--strategy", default="fsdp", help="mesh.strategy (sharding.STRATEGIES)")
    parser.add_argument("--compile-only", action="store_true",
                        help="XLA's memory analysis of the creation, nothing allocated")
    return parser.parse_args(argv)


def creation(args):
    """(mesh, abstract state, jitted creation placing every parameter in its sharding)."""
    import jax
    from flax import nnx

    from configs import flair
    from spectralmoe_jax import build, config_lib, run_config, sharding
    from spectralmoe_jax.models.segmentor import Segmentor
    from spectralmoe_jax.models.vit import VisionTransformer

    config = flair.get_config()
    config.model.vfm = config_lib.vfm_config(args.preset, in_channels=len(config.data.bands))
    if args.depth:
        config.model.vfm.overrides.depth = args.depth
    config.mesh.strategy = args.strategy
    config.mesh.update({"data": 1, "fsdp": -1} if args.strategy in ("fsdp", "tensor") else {})
    run = run_config.parse(config)
    mesh = sharding.make_mesh(run.mesh)
    model = run.model.segmentor()
    if args.part == "vfm":
        def create():
            return VisionTransformer(model.vfm, rngs=nnx.Rngs(run.seed))
    else:
        def create():
            return Segmentor(model, rngs=nnx.Rngs(run.seed))
    state = nnx.state(nnx.eval_shape(create))
    if args.part == "segmentor":  # exactly the composition root's initialiser
        place = sharding.param_sharding(mesh, run.mesh.strategy)
        variables = sharding.flat_variables(state)
        shardings = {path: place(path, v) for path, v in variables.items()}
        return mesh, state, build.initialiser(model, run.seed, sorted(variables), shardings)
    shardings = sharding.variable_shardings(state, mesh, run.mesh.strategy)
    return mesh, state, jax.jit(lambda: nnx.state(create()), out_shardings=shardings)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    baseline = memory_gib("VmRSS")
    start = time.perf_counter()
    mesh, state, create = creation(args)
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    out = {"preset": args.preset, "depth": args.depth, "part": args.part,
           "strategy": args.strategy, "mesh": dict(mesh.shape), "model_gib": nbytes / 2**30}
    compiled = create.lower().compile()
    analysis = compiled.memory_analysis()
    out.update(per_device_output_gib=analysis.output_size_in_bytes / 2**30,
               per_device_temp_gib=analysis.temp_size_in_bytes / 2**30)
    # Simulated devices share the host: it holds every device's buffers at once.
    out["host_predicted_gib"] = args.devices * (out["per_device_output_gib"]
                                                + out["per_device_temp_gib"])
    if not args.compile_only:
        before = memory_gib("VmRSS")  # compiled, nothing created yet
        leaves = jax.tree.leaves(compiled())
        jax.block_until_ready(leaves)
        out["per_device_gib"] = max(
            sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
            for d in jax.local_devices()) / 2**30
        out["host_measured_gib"] = memory_gib("VmHWM") - before  # the creation's own peak
        out["compile_gib"] = before - baseline  # XLA and the runtime, before any parameter
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
