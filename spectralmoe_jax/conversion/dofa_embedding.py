"""DOFA's dynamic patch embedding (`Dynamic_MLP_OFA`) -> `models.dofa_embedding.DynamicPatchEmbed`.

Source names are those of zhu-xlab/DOFA's state dict (`patch_embed.fclayer.w1.weight`,
`patch_embed.weight_generator.transformer_encoder.layers.0.self_attn.in_proj_weight`, ...).
`torch.nn.MultiheadAttention` packs q, k and v in one `in_proj_weight` [3D, D]; our `in_proj`
keeps that packing, so it converts with the plain Linear transpose.
"""

from __future__ import annotations

import re

from spectralmoe_jax.conversion.rules import Rule, identity, linear_kernel


def dofa_embedding_rules(prefix: str = "patch_embed.", target_prefix: str = "") -> list[Rule]:
    """Rules for the embedding's keys under `prefix`, targeting paths under `target_prefix`.

    `target_prefix` is where the module sits in the target model: '' for a standalone
    `DynamicPatchEmbed`, 'patch_embed/' when it is the `patch_embed` attribute of a ViT.
    """
    src = re.escape(prefix)
    wg = src + r"weight_generator\."
    layer = wg + r"transformer_encoder\.layers\.(\d+)\."
    dst = target_prefix
    dst_layer = dst + r"weight_generator/layers/\1/"

    def linear(source: str, target: str) -> list[Rule]:
        return [
            Rule(source + r"\.weight", target + "/kernel", linear_kernel),
            Rule(source + r"\.bias", target + "/bias", identity),
        ]

    return [
        *linear(src + r"fclayer\.(w[12])", dst + r"fclayer/\1"),
        Rule(wg + "weight_tokens", dst + "weight_generator/weight_tokens", identity),
        Rule(wg + "bias_token", dst + "weight_generator/bias_token", identity),
        *linear(wg + "fc_weight", dst + "weight_generator/fc_weight"),
        *linear(wg + "fc_bias", dst + "weight_generator/fc_bias"),
        Rule(layer + r"self_attn\.in_proj_weight", dst_layer + "self_attn/in_proj/kernel",
             linear_kernel),
        Rule(layer + r"self_attn\.in_proj_bias", dst_layer + "self_attn/in_proj/bias", identity),
        *linear(layer + r"self_attn\.out_proj", dst_layer + "self_attn/out_proj"),
        *linear(layer + "(linear[12])", dst_layer + r"\2"),
        Rule(layer + r"(norm[12])\.weight", dst_layer + r"\2/scale", identity),
        Rule(layer + r"(norm[12])\.bias", dst_layer + r"\2/bias", identity),
    ]
