"""The `convert` mode: a PyTorch checkpoint -> Orbax parameters for this config's model.

What the file holds decides what is converted:
- a released SpectralMoE / REIN MMSegmentation checkpoint (`decode_head.*` keys): the adapter
  and the head; use the result as `--config.model.checkpoint=DIR`;
- a foundation model (DINOv2 / DINOv3 / PromptDA / DOFA, facebookresearch or HF naming): the
  backbone named by `--config.model.convert_target` ('vfm', default, or 'depth'), with the
  released options (patch kernel / position table resize, multispectral stem); use the result as
  `--config.model.vfm.checkpoint=DIR` (or `depth`).
"""

from __future__ import annotations

import os

from spectralmoe_jax.conversion.torch_io import load_state_dict


def convert_checkpoint(config, input_path: str, output_dir: str) -> str:
    from flax import nnx

    from spectralmoe_jax.conversion import segmentor as trained
    from spectralmoe_jax.conversion.rules import load_into_module
    from spectralmoe_jax.conversion.vit import convert_state_dict, save_params
    from spectralmoe_jax.models.segmentor import Segmentor

    state = load_state_dict(input_path)
    model = nnx.eval_shape(lambda: Segmentor(config.model, rngs=nnx.Rngs(0)))
    if any(key.startswith("decode_head.") for key in state):
        params = trained.convert_trained_parts(state, model)
        load_into_module(trained.TrainedParts(model), params)
        trained.save_trained_parts(model, output_dir)
        what = "adapter + Mask2Former head"
    else:
        target = config.model.get("convert_target", "vfm")
        module, cfg = getattr(model, target), config.model[target]
        params = convert_state_dict(state, module.config, cfg.get("checkpoint_scheme", "auto"),
                                    prefix=cfg.get("checkpoint_prefix", ""), resize_patch=True,
                                    resize_pos=True, stem=cfg.get("stem", "cyclic"))
        load_into_module(module, params)
        save_params(module, output_dir)
        what = f"{target} backbone ({module.config.family})"
    print(f"converted {input_path} -> {os.path.abspath(output_dir)}: {what}, {len(params)} arrays")
    return output_dir
