"""The benchmark's parts (scripts/bench/) build programs that trace, on the demo configuration.

Nothing is compiled or timed: the test keeps the part definitions that scripts/benchmark.py and
scripts/aot_check.py share in step with the package they measure.
"""

import argparse
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench  # noqa: E402
import benchmark  # noqa: E402
from bench.hlo import hlo_stats  # noqa: E402


@pytest.fixture(scope="module")
def context():
    parser = argparse.ArgumentParser()
    benchmark.add_model_args(parser)
    args = parser.parse_args(["--config", "configs/demo.py", "--batch", "1", "--size", "64",
                              "--backbones", "dinov3_vits16", "--eval-batch", "2"])
    args.fit_batch = 2
    return benchmark.make_context(args, abstract=True)[0]


# (fit is the step at another batch; input runs no jitted program)
@pytest.mark.parametrize("part", [p for p in bench.ALL_PARTS if p not in ("input", "fit")])
def test_every_program_traces(context, part):
    programs = list(bench.programs_of(part, context))
    assert programs, part
    for program in programs:
        assert len(program.layout) in (0, len(program.args)), program.name
        out = jax.eval_shape(program.fn, *program.args)
        assert jax.tree.leaves(out), program.name


def test_hlo_stats_counts_copies_and_transposes_inside_and_outside_fusions():
    text = """HloModule m

%fused_computation (param_0: f32[4,8]) -> f32[8,4] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%param_0), dimensions={1,0}
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %gte = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %copy.2 = f32[4,8]{1,0} copy(%gte)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %copy.2)
}

ENTRY %main (a: f32[4,8]) -> f32[8,4] {
  %a = f32[4,8]{1,0} parameter(0)
  %copy.1 = f32[4,8]{1,0} copy(%a)
  %all-reduce.1 = f32[4,8]{1,0} all-reduce(%copy.1), to_apply=%body
  ROOT %fusion.1 = f32[8,4]{1,0} fusion(%all-reduce.1), kind=kLoop, calls=%fused_computation
}
"""
    stats = hlo_stats(text)
    assert stats["copies"] == 1 and stats["transposes"] == 1
    assert stats["kernels"]["fusion"] == 1 and stats["fused"]["transpose"] == 1
    assert stats["collectives"] == {"all-reduce": 1}
    assert stats["copy_transpose_kinds"] == {"copy of parameter (kernel, entry)": 1,
                                             "transpose of parameter (fused, entry)": 1}


SPLASH_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from bench.attention import splash_attention
from spectralmoe_jax.models.attention import dot_product_attention
jax.config.update("jax_default_matmul_precision", "highest")
mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 1), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
q, k, v = (jax.random.normal(key, (4, 37, 2, 64)) for key in jax.random.split(jax.random.key(0), 3))
reference = dot_product_attention(q, k, v, implementation="xla")
batch = NamedSharding(mesh, P("data"))
for multiple in (1, 128):
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: splash_attention(q, k, v, head_dim_multiple=multiple),
                     in_shardings=(batch,) * 3)
        text, out = fn.lower(q, k, v).as_text(), fn(q, k, v)
    assert "manual_computation" in text or "shard_map" in text, text[:2000]
    error = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
    assert error < 1e-5, (multiple, error)
print("ok")
"""


def test_splash_attention_runs_per_shard_on_a_mesh_and_equals_xla():
    """aot_check.py compiles the TPU splash kernel on a multi-chip mesh only inside a shard_map
    (XLA cannot partition a Mosaic kernel); here the same program in Pallas' interpreter on 4
    CPU devices, against XLA attention."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(root / "scripts"), str(root)]),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SPLASH_ON_A_MESH], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
