"""VPT-deep (Jia et al. ECCV 2022; KMnP/vpt `src/models/vit_prompt/vit.py`,
`PromptedTransformer.incorporate_prompt` and `forward_deep_prompt`): learned prompt tokens in
front of every frozen block.

The released model puts P prompts after the class token (after the position embeddings) and,
before every later block, overwrites the prompt slots with that block's prompts, so every
block's prompt outputs are discarded. Here, equivalently: before block l the prompts_l [P, D] are
inserted after the prefix tokens (class and registers / storage tokens, so RoPE and the position
table still skip them), the block runs, their outputs are dropped (`BlockTaps.prompts`,
models/vit.py). Init U(+-sqrt(6 / (3 p^2 + D))) ("xavier_uniform" with the patch size p), no
projection (PROJECT -1), prompt dropout 0 (the released defaults). The paper's Table 3 count
(3.69 M on ViT-L) is 150 prompts per block: 24 x 150 x 1024 = 3,686,400. The decoder is the
plain Mask2Former head; the prompts never reach it.
"""

from __future__ import annotations

import math

from flax import nnx

from spectralmoe_jax.models.adapters import taps as taps_lib
from spectralmoe_jax.models.spectral_moe import AdapterConfig, _uniform
from spectralmoe_jax.models.vit import BlockTaps


class DeepPrompts(taps_lib.InBlockAdapter):
    """prompts [L, P, D]."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        self.config = config
        bound = math.sqrt(6.0 / (3 * config.patch_size**2 + config.width))
        self.prompts = nnx.Param(_uniform(bound)(
            rngs.params(), (config.num_layers, config.vpt_tokens, config.width)))

    def block_taps(self, *, train: bool, rng=None) -> BlockTaps:
        c = self.config
        keyed = train and c.vpt_dropout > 0
        params = taps_lib.scan_params(None, {"prompts": self.prompts[...]},
                                      rng=rng if keyed else None, num_layers=c.num_layers)
        return BlockTaps(params=params, num_prompts=c.vpt_tokens,
                         prompts=lambda p: taps_lib.dropout(p["prompts"], c.vpt_dropout, p))
