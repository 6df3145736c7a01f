"""Test helper: a VisionTransformer filled from a PyTorch state dict through our converter."""

from collections.abc import Sequence

from flax import nnx

from spectralmoe_jax.conversion.rules import load_into_module
from spectralmoe_jax.conversion.torch_io import load_state_dict
from spectralmoe_jax.conversion.vit import config_for_checkpoint, convert_state_dict
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig


def load_vit(state, config: ViTConfig, scheme: str = "auto", *,
             allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
             resize_patch: bool = False, resize_pos: bool = False,
             stem: str | None = None) -> VisionTransformer:
    """`state`: a state dict or a PyTorch file; the settings its naming implies fill the
    config's unset fields, as the loading path does. `allow_missing` / `allow_unexpected`:
    regular expressions naming our parameters that may keep their initial values / checkpoint
    keys that may be dropped."""
    if isinstance(state, str):
        state = load_state_dict(state)
    config = config_for_checkpoint(state, config, scheme)
    def build():
        return VisionTransformer(config, rngs=nnx.Rngs(0))

    # Every parameter comes from the checkpoint unless some may be missing: shapes only then.
    model = nnx.jit(build)() if allow_missing else nnx.eval_shape(build)
    params = convert_state_dict(state, config, scheme, allow_unexpected=allow_unexpected,
                                allow_missing=allow_missing, resize_patch=resize_patch,
                                resize_pos=resize_pos, stem=stem)
    load_into_module(model, params, allow_missing=allow_missing)
    return model
