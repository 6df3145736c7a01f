"""The Mask2Former loss with its Hungarian matching, forward + backward to the logits, and the
matcher alone, on logits of every decoder layer (deep supervision)."""

from __future__ import annotations

import jax

from bench.program import REPLICATED, Context, Program
from spectralmoe_jax.training.mask2former_loss import (
    mask2former_loss, match_queries, sample_point_draws, semantic_to_targets)


def programs(ctx: Context):
    c = ctx.model.head.config
    batch, size = ctx.batch, ctx.size
    layers = c.decoder_layers + 1
    k = ctx.config.data.num_classes
    class_logits = ctx.array(jax.random.key(13), (layers, batch, c.num_queries, k + 1), ctx.dtype)
    mask_logits = ctx.array(jax.random.key(14),
                            (layers, batch, c.num_queries, size // 4, size // 4), ctx.dtype)
    labels = ctx.labels(jax.random.key(15), batch, size)
    loss_config = ctx.config.loss
    ignore = ctx.config.data.ignore_index
    args = (class_logits, mask_logits, labels, jax.random.key(16))
    layout = (1, 1, 0, REPLICATED)

    def loss(class_logits, mask_logits, labels, rng):
        targets = semantic_to_targets(labels, k, ignore_index=ignore)
        outputs = {"class_logits": class_logits, "mask_logits": mask_logits}
        return mask2former_loss(outputs, targets, rng, loss_config)[0]

    yield Program("loss_forward_backward", jax.value_and_grad(loss, argnums=(0, 1)), args,
                  layout=layout, images=batch)

    def matching(class_logits, mask_logits, labels, rng):
        targets = semantic_to_targets(labels, k, ignore_index=ignore)
        draws = sample_point_draws(rng, layers, batch, k, loss_config)
        per_image = jax.vmap(lambda cl, ml, t, coords: match_queries(cl, ml, t, coords,
                                                                     loss_config))
        return jax.vmap(per_image, in_axes=(0, 0, None, 0))(
            class_logits, mask_logits, targets, draws["matcher_coords"])

    yield Program("matcher_forward", matching, args, layout=layout, images=batch)
