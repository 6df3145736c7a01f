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
