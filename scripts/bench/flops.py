"""Matmul FLOPs of a traced program, and the closed form for the ViTs that checks the count.

`jaxpr_flops` counts every `dot_general` and convolution of a jaxpr, scan bodies times their
trip count, cuDNN attention from its shapes. XLA's `cost_analysis()` counts a while loop's body
once (one ViT block of 24), so it is kept only for reference (`flops_xla`).
"""

from __future__ import annotations

import math

from jax.extend import core as jax_core


def vit_flops(vit_config, batch: int, image_hw: tuple[int, int], *, backward: bool) -> dict:
    """Matmul FLOPs (2 per multiply-add) of a ViT forward, or forward + backward as the train step
    runs it: every block's input gradient (the scan's backward runs all of them, block 0's
    included), no weight gradient (frozen). Attention backward = dP, dQ, dK, dV: 2x forward.

    A check of `jaxpr_flops` (they agree exactly for the XLA attention path). Elementwise work
    (norms, softmax, GELU, RoPE) is not counted: it is not matmul-unit work.
    """
    c = vit_config
    n = (image_hw[0] // c.patch_size) * (image_hw[1] // c.patch_size)
    t = n + 1 + c.num_register_tokens
    d = c.width
    ffn = (3 if c.ffn == "swiglu" else 2) * d * c.mlp_dim
    dense = 2 * batch * t * (4 * d * d + ffn)  # qkv, proj and the FFN, per block
    attention = 4 * batch * t * t * d  # q k^T and p v, per block
    patch = 2 * batch * n * c.patch_size ** 2 * c.in_channels * d
    forward = patch + c.depth * (dense + attention)
    out = {"tokens": t, "dense": c.depth * dense, "attention": c.depth * attention,
           "forward": forward, "total": forward}
    if backward:
        out["attention"] += c.depth * 2 * attention
        out["dense"] += c.depth * dense
        out["total"] = forward + c.depth * (dense + 2 * attention)
    return out


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs (2 per multiply-add) of a jaxpr: dot_general, convolutions and cuDNN
    attention, with scan bodies counted `length` times and the costlier branch of a cond.

    XLA's `cost_analysis()` counts a while loop's body once, so for a ViT under `lax.scan` it
    sees one block of 24; the jaxpr knows the trip count. While loops of unknown trip count (the
    matcher's) count once: they hold no matmuls. Recomputation under `jax.checkpoint` is
    counted (only the deformable sampling is rematerialised, and it has no matmul, unless a
    ViT's `remat` policy is set). Pallas kernels (attention='pallas') are opaque: not counted,
    see `pallas_calls`.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2.0 * math.prod(out) * math.prod(shapes[0][i] for i in contract)
        elif name == "conv_general_dilated":
            rhs, spec = shapes[1], eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[spec[0]]
        elif name.startswith("dot_product_attention_"):  # cuDNN: fwd q k^T, p v; bwd 4 products
            q, k = shapes[0], shapes[1]
            layout = eqn.params.get("layout", 0)  # jax's AttentionLayout: BTNH = 0, BNTH = 1
            s_len = k[2] if layout == 1 or "BNTH" in str(layout) else k[1]
            products = 4 if "bwd" in name else 2
            # Each product is 2 B N T S H FLOPs, q has B T N H elements (the padded lengths).
            total += 2.0 * products * math.prod(q) * s_len
        sub = [jaxpr_flops(j) for j in jax_core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(sub, default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * sum(sub)
        else:
            total += sum(sub)
    return total


def pallas_calls(jaxpr) -> int:
    """How many Pallas kernels a jaxpr calls (their FLOPs are missing from `jaxpr_flops`)."""
    return sum((eqn.primitive.name == "pallas_call")
               + sum(pallas_calls(j) for j in jax_core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)
