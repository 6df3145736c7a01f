"""The `convert` mode: a PyTorch checkpoint -> a converted folder for this config's model.

What the file holds decides what is converted:
- a released SpectralMoE / REIN MMSegmentation checkpoint (`decode_head.*` keys): the adapter
  and the head; use the result as `--checkpoint=DIR` (or `--config.model.checkpoint=DIR`);
- a foundation model (DINOv2 / DINOv3 / PromptDA / DOFA, facebookresearch or HF naming): the
  backbone named by `--config.model.convert_target` ('vfm', default, or 'depth'), with the
  released options (patch kernel / position table resize, multispectral stem); use the result as
  `--config.model.vfm.checkpoint=DIR` (or `depth`).
The folder records what it holds and what its origin implies (`conversion.json`), so loading it
later builds the same model as loading the original file.
"""

from __future__ import annotations

import os

from flax import nnx

from spectralmoe_jax.conversion import load
from spectralmoe_jax.conversion import vit as vit_conversion
from spectralmoe_jax.conversion.rules import ConversionError, check_params, flatten_state
from spectralmoe_jax.models.segmentor import Segmentor, trained_variables
from spectralmoe_jax.models.vit import VisionTransformer

TRAINED_PREFIXES = ("decode_head.",)


def holds_trained_parts(state) -> bool:
    return any(key.startswith(TRAINED_PREFIXES) for key in state)


def convert_checkpoint(run, input_path: str, output_dir: str) -> str:
    """`run` is a `RunConfig`; writes `output_dir` and returns it."""
    opened = load.open_checkpoint(input_path)
    if opened.kind != "torch":
        raise ConversionError(f"{input_path}: --mode convert reads a PyTorch file, not a folder")
    if holds_trained_parts(opened.state):
        implied = {"adapter": dict(opened.implied)}
        config = run.model.segmentor(implied)
        model = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(0)))
        params = load.trained_params(opened, model)
        check_params(params, trained_variables(flatten_state(nnx.state(model))), where=input_path)
        meta = {"holds": "trained", "implied": implied["adapter"]}
        what = "adapter + Mask2Former head"
    else:
        target = run.model.convert_target
        if target not in ("vfm", "depth"):
            raise ConversionError(f"config model.convert_target {target!r}: 'vfm' or 'depth'")
        backbone = getattr(run.model, target)
        opened.state = vit_conversion.select_prefix(
            opened.state, backbone.weights.checkpoint_prefix, input_path)
        opened.scheme = backbone.weights.checkpoint_scheme
        implied = load.backbone_implied(opened, backbone.vit(run.model.dtype))
        vit = backbone.vit(run.model.dtype, implied)
        params = load.backbone_params(opened, vit, stem=backbone.weights.stem)
        module = nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0)))
        check_params(params, flatten_state(nnx.state(module)), where=input_path)
        meta = {"holds": target, "family": vit.family, "scheme": opened.scheme,
                "implied": implied}
        what = f"{target} backbone ({vit.family}, {opened.scheme} naming)"
    load.write_converted(output_dir, params, dict(meta, source=os.path.abspath(input_path)))
    print(f"converted {input_path} -> {os.path.abspath(output_dir)}: {what}, {len(params)} arrays")
    return output_dir
