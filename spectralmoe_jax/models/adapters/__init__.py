"""Every fine-tuning method of the paper's comparisons as an adapter kind (`AdapterConfig.kind`),
behind one contract (docs/design.md, "The adapter contract"; docs/methods.md):

  after the blocks (the ViT's hook):  spectral_moe, rein (models/spectral_moe.py), set, fada,
                                      depthforge
  inside the blocks (BlockTaps):      lora, adaptformer, vpt

Each module holds its trainable parameters (under the segmentor's `adapter/`, so everything of
the frozen ViTs stays frozen) and answers `query_embedding()` (the released heads' link from the
tokens to the decoder queries, or None).
"""

from __future__ import annotations

from flax import nnx

from spectralmoe_jax.models.adapters.adaptformer import AdaptFormer
from spectralmoe_jax.models.adapters.depthforge import DepthForge
from spectralmoe_jax.models.adapters.fada import FADA
from spectralmoe_jax.models.adapters.lora import LoRA, check_targets
from spectralmoe_jax.models.adapters.set_adapter import SET
from spectralmoe_jax.models.adapters.vpt import DeepPrompts
from spectralmoe_jax.models.spectral_moe import IN_BLOCK_KINDS, AdapterConfig, SpectralMoE
from spectralmoe_jax.models.vit import ViTConfig

# The methods built on REIN's tokens, whose released heads take their queries from the tokens
# and their query features from those (`replace_query_feat`).
REIN_FAMILY = ("rein", "set", "fada", "depthforge")
AFTER_BLOCK = {"spectral_moe": SpectralMoE, "rein": SpectralMoE, "set": SET, "fada": FADA,
               "depthforge": DepthForge}
IN_BLOCK = {"lora": LoRA, "adaptformer": AdaptFormer, "vpt": DeepPrompts}
assert set(IN_BLOCK) == set(IN_BLOCK_KINDS)


def in_block(config: AdapterConfig) -> bool:
    """Whether the method works inside the frozen blocks (BlockTaps) rather than after them."""
    return config.kind in IN_BLOCK


def uses_depth(config: AdapterConfig) -> bool:
    """Whether the method reads the depth encoder's tokens."""
    return config.kind == "depthforge" or config.depth


def build_adapter(config: AdapterConfig, vit: ViTConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if config.kind == "lora":
        return LoRA(config, vit, rngs=rngs)
    table = IN_BLOCK if in_block(config) else AFTER_BLOCK
    return table[config.kind](config, rngs=rngs)


def check_adapter(config: AdapterConfig, vit: ViTConfig, *, depth: bool,
                  adapter_layers) -> None:
    """What a method needs of the ViT and the rest of the model: a ValueError naming the field."""
    kind = config.kind
    if in_block(config):
        if config.link_token_to_query:
            raise ValueError(f"model.adapter.link_token_to_query: {kind} has no tokens to link "
                             f"to the decoder queries")
        if adapter_layers is not None:
            raise ValueError(f"model.adapter_layers places an adapter after chosen blocks; "
                             f"{kind} works inside every block: leave it unset")
    if kind == "lora":
        check_targets(config.lora_targets, vit)
        if config.lora_rank < 1:
            raise ValueError(f"model.adapter.lora_rank={config.lora_rank}: must be positive")
    if kind == "vpt" and vit.window_size:
        raise ValueError("model.adapter.kind='vpt': prompt tokens have no place in windowed "
                         "attention (SAM's windows partition the patch grid)")
    if kind == "vpt" and config.vpt_tokens < 1:
        raise ValueError(f"model.adapter.vpt_tokens={config.vpt_tokens}: must be positive")
    if kind == "fada" and config.width % 4:
        raise ValueError(f"model.adapter.kind='fada' splits the width in quarters; width "
                         f"{config.width} is not divisible by 4")
    if kind in ("set", "fada") and min(config.sample_group_train, config.sample_group_eval) < 1:
        raise ValueError("model.adapter.sample_group_train / sample_group_eval must be positive")
    if kind == "depthforge" and not depth:
        raise ValueError("model.adapter.kind='depthforge' reads the depth encoder's tokens: "
                         "enable model.depth")
