"""The `convert` mode: a PyTorch checkpoint -> converted folders for this config's model.

What the file holds decides what is converted (`conversion/segmentor.py: checkpoint_parts`):
- parts of a released SpectralMoE / REIN MMSegmentation checkpoint: the adapter
  (`backbone.depthmoe.*` / `backbone.reins.*`, or bare `depthmoe.*`) and the head
  (`decode_head.*`), one or both; use the result as `--checkpoint=DIR` (or
  `--config.model.checkpoint=DIR`). A full checkpoint also holds the frozen backbones
  (`backbone.*`, PromptDA under `backbone.depth_anything.*`): then DIR/trained, DIR/vfm and
  DIR/depth, one call;
- a foundation model (DINOv2 / DINOv3 / PromptDA / DOFA, facebookresearch or HF naming, or an
  HF Dinov2 exported to `.onnx`): the backbone named by `--config.model.convert_target` ('vfm',
  default, or 'depth'), with the released options (patch kernel / position table resize,
  multispectral stem); use the result as `--config.model.vfm.checkpoint=DIR` (or `depth`).
Each folder records what it holds and what its origin implies (`conversion.json`: released
DepthMoE weights imply the released adapter math), so loading it later builds the same model as
loading the original file. Every problem of every part is one ConversionError.
"""

from __future__ import annotations

import os

from flax import nnx

from spectralmoe_jax.conversion import adapter as adapter_conversion
from spectralmoe_jax.conversion import load
from spectralmoe_jax.conversion import segmentor as released
from spectralmoe_jax.conversion import vit as vit_conversion
from spectralmoe_jax.conversion.rules import ConversionError, check_params, flatten_state
from spectralmoe_jax.models.segmentor import Segmentor, trained_variables
from spectralmoe_jax.models.vit import VisionTransformer


def _trained(run, opened, parts):
    """The adapter and / or head, converted for the model the file implies."""
    adapter_conversion.log_implied(opened.path, opened.implied, run.model.adapter)
    config = run.model.segmentor({"adapter": dict(opened.implied)})
    model = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(0)))
    params = released.convert_trained_parts(opened.state, model, parts)
    expected = {k: v for k, v in trained_variables(flatten_state(nnx.state(model))).items()
                if k.split("/")[0] in parts}
    check_params(params, expected, where=opened.path)
    implied = dict(opened.implied)
    if not implied and "adapter" in parts and config.adapter.kind == "spectral_moe":
        implied = {"compat": config.adapter.compat}  # what the converted adapter computes
    what = " + ".join(parts)
    if implied:
        what += " (" + ", ".join(f"model.adapter.{k}={v!r}" for k, v in implied.items()) + ")"
    return params, {"holds": "trained", "parts": list(parts), "implied": implied}, what


def _backbone(run, target, opened):
    """A frozen backbone, with the settings its naming implies (position-table resize)."""
    backbone = getattr(run.model, target)
    implied = load.backbone_implied(opened, backbone.vit(run.model.dtype))
    vit = backbone.vit(run.model.dtype, implied)
    params = load.backbone_params(opened, vit, stem=backbone.weights.stem)
    module = nnx.eval_shape(lambda: VisionTransformer(vit, rngs=nnx.Rngs(0)))
    check_params(params, flatten_state(nnx.state(module)), where=opened.path)
    meta = {"holds": target, "family": vit.family, "scheme": opened.scheme, "implied": implied}
    return params, meta, f"{target} backbone ({vit.family}, {opened.scheme} naming)"


def convert_checkpoint(run, input_path: str, output_dir: str) -> str:
    """`run` is a `RunConfig`; writes `output_dir` and returns it."""
    opened = load.open_checkpoint(input_path)
    if opened.kind != "torch":
        raise ConversionError(f"{input_path}: --mode convert reads a PyTorch file, not a folder")
    parts = released.checkpoint_parts(opened.state)
    trained = tuple(p for p in parts if p in released.TRAINED)
    jobs = []  # (folder, name, convert)
    if trained:
        backbones = [p for p in ("vfm", "depth") if p in parts]
        nested = bool(backbones)
        jobs.append((os.path.join(output_dir, "trained") if nested else output_dir, "trained",
                     lambda: _trained(run, opened, trained)))
        for part in backbones:
            scheme = run.model.vfm.weights.checkpoint_scheme if part == "vfm" else "promptda"
            sub = load.Opened(f"{input_path} ({part})", "torch",
                              released.backbone_state(opened.state, part), scheme=scheme)
            jobs.append((os.path.join(output_dir, part), part,
                         lambda part=part, sub=sub: _backbone(run, part, sub)))
    else:
        target = run.model.convert_target
        if target not in ("vfm", "depth"):
            raise ConversionError(f"config model.convert_target {target!r}: 'vfm' or 'depth'")
        backbone = getattr(run.model, target)
        opened.state = vit_conversion.select_prefix(
            opened.state, backbone.weights.checkpoint_prefix, input_path)
        opened.scheme = backbone.weights.checkpoint_scheme
        jobs.append((output_dir, target, lambda: _backbone(run, target, opened)))

    results, errors = [], []
    for folder, name, convert in jobs:
        try:
            results.append((folder, name, *convert()))
        except ConversionError as error:
            message = str(error)
            errors.append(message if name == "trained" else f"{name}: {message}")
    if errors:
        raise ConversionError(" || ".join(errors))
    source = os.path.abspath(input_path)
    for folder, name, params, meta, what in results:
        load.write_converted(folder, params, dict(meta, source=source))
        flag = "--checkpoint" if name == "trained" else f"--config.model.{name}.checkpoint"
        print(f"converted {input_path} -> {os.path.abspath(folder)}: {what}, {len(params)} "
              f"arrays; use {flag}={folder}")
    return output_dir
