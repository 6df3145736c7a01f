"""The benchmark's parts, one module each (docs/benchmarks.md).

A part's `programs(ctx)` yields the jitted functions it measures with their arguments
(`program.Program`); `scripts/benchmark.py` compiles and times them here, `scripts/aot_check.py`
compiles the same programs for a GPU or TPU target. A part that measures no jitted program (the
input pipeline) has `run_part(ctx)` instead, run by the timing harness only.
"""

from bench import (adapter, attention, backbones, decoder, depth, evaluation, input_pipeline,
                   loss, matmul, optimizer, step, vfm)

# name -> a module with `programs(ctx)` or `run_part(ctx)`; the order is the run order of 'all'.
PARTS = {
    "matmul": matmul,        # the matmul peak MFU is measured against
    "step": step,            # the whole jitted train step, state donated
    "eval": evaluation,      # the evaluation runner's compiled inference
    "vfm": vfm,              # frozen VFM forward, and forward + backward to a per-block term
    "attention": attention,  # the VFM's attention alone, per kernel
    "depth": depth,          # the depth encoder forward
    "adapter": adapter,      # one adapter layer vs one block; the VFM with the adapter
    "decoder": decoder,      # pixel decoder and masked-attention decoder
    "loss": loss,            # Mask2Former loss with matching; the matcher alone
    "optimizer": optimizer,  # the AdamW update
    "input": input_pipeline,  # the grain pipeline, tiles/s (not a jitted program)
    "backbones": backbones,  # each ViT-L preset's forward
}
# Not in 'all': 'backbones' (three more ViT compiles) and 'fit' (the step at --fit-batch,
# compile only, for its memory).
DEFAULT_PARTS = ("matmul", "step", "eval", "vfm", "attention", "depth", "adapter", "decoder",
                 "loss", "optimizer", "input")


def programs_of(name: str, ctx):
    """The programs of a part ('fit' is the step's compile-only variant), or None for a part
    that runs no jitted program."""
    if name == "fit":
        return step.fit_programs(ctx)
    module = PARTS[name]
    return module.programs(ctx) if hasattr(module, "programs") else None


ALL_PARTS = tuple(PARTS) + ("fit",)
