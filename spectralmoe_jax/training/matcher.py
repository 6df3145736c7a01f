"""Hungarian matching of queries to targets, in JAX, and Mask2Former's matching cost.

The assignment is solved inside the jitted training step, not by a host callback to scipy's
`linear_sum_assignment` (what HF transformers and mmdet do): a callback splits the step into
two XLA programs with a device->host->device round trip per step (synchronising the stream,
copying [L + 1, B, Q, T] costs out and indices back), and does not vmap over decoder layers and
images. The problem is tiny (Q = 100 queries, T <= 24 targets), so an exact O(T^2 Q) shortest
augmenting path solver written with `lax` loops costs little next to the rest of the step.

Costs follow Mask2Former (Cheng et al. 2022; mmdet `HungarianAssigner` with `ClassificationCost`,
`CrossEntropyLossCost`, `DiceCost`; HF `Mask2FormerHungarianMatcher`).
"""
import jax
import jax.numpy as jnp
from jax import lax

from spectralmoe_jax.training.point_sampling import point_sample

# Non-finite costs become this: such pairs are assigned only when nothing else is possible
# (HF replaces them by the float max; a finite value keeps the dual updates finite).
_NONFINITE_COST = 1e15


def _where(condition, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def hungarian_matching(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact minimum-cost assignment of every valid target to a distinct query.

    Args:
      cost: `[Q, T]` cost of giving target t to query q, with Q >= T.
      valid: `[T]` bool; invalid (padding) targets take part in nothing.

    Returns:
      `query_index [T] int32` (the query of each target; 0 where not matched) and
      `matched [T] bool` (= valid: with Q >= T every valid target gets a query).

    The shortest augmenting path form of the Hungarian algorithm (Kuhn-Munkres with the
    Jonker-Volgenant / Dijkstra inner loop, as in e-maxx's O(n^2 m) version): targets are added
    one at a time; each runs a Dijkstra search over queries on reduced costs
    `cost - u[target] - v[query]` from a virtual column until it reaches a free query, then flips
    the alternating path. The duals (u, v) stay feasible and tight on matched pairs, which makes
    the final matching optimal. Static shapes, `lax` loops only: jit- and vmap-able.

    Every loop has a fixed trip count (the search and the flip stop changing the state once
    done) and there is no `lax.cond`: on a GPU, XLA reads a data-dependent loop predicate or a
    branch index on the host, a synchronisation per iteration inside the training step.
    """
    num_queries, num_targets = cost.shape
    if num_targets > num_queries:
        raise ValueError(f"hungarian_matching: needs Q >= T, got cost of shape {cost.shape}")
    if valid.shape != (num_targets,):
        raise ValueError(f"hungarian_matching: valid must be [{num_targets}], got {valid.shape}")
    if num_targets == 0:
        return jnp.zeros(0, jnp.int32), valid
    # Rows are targets, columns are queries; column Q is the virtual start column, row T the
    # "no target" sentinel (u[T] is a scratch slot that absorbs masked updates).
    cost = jnp.nan_to_num(cost.T.astype(jnp.float32), nan=_NONFINITE_COST,
                          posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
    free_column = num_queries

    def add_row(row, state):
        owner, u, v = state  # owner [Q + 1]: row holding each column (T = none)
        owner = owner.at[free_column].set(row)

        def search_step(carry):
            column, used, min_slack, way, u, v = carry
            used = used.at[column].set(True)
            r = owner[column]
            slack = cost[r] - u[r] - v
            unused = ~used[:num_queries]
            better = unused & (slack < min_slack)
            min_slack = jnp.where(better, slack, min_slack)
            way = jnp.where(better, column, way)
            candidate = jnp.where(unused, min_slack, jnp.inf)
            next_column = jnp.argmin(candidate).astype(jnp.int32)
            delta = candidate[next_column]
            # Shift the duals of the search tree so that next_column's edge becomes tight.
            u = u.at[owner].add(jnp.where(used, delta, 0.0))
            v = v - jnp.where(used[:num_queries], delta, 0.0)
            min_slack = jnp.where(unused, min_slack - delta, min_slack)
            return next_column, used, min_slack, way, u, v

        def search_until_free(_, carry):
            # A step while the newest tree column is still assigned, then nothing.
            searching = owner[carry[0]] != num_targets
            return _where(searching, search_step(carry), carry)

        carry = (jnp.int32(free_column), jnp.zeros(num_queries + 1, bool),
                 jnp.full(num_queries, jnp.inf, jnp.float32),
                 jnp.full(num_queries, free_column, jnp.int32), u, v)
        # Each step adds one assigned column to the tree and at most `row` are assigned, so a
        # free column is reached within T steps after the first.
        column, _, _, way, u, v = lax.fori_loop(0, num_targets, search_until_free,
                                                search_step(carry))

        def flip_until_start(_, c):
            column, owner = c
            previous = way[column]
            flipped = (previous, owner.at[column].set(owner[previous]))
            return _where(column != free_column, flipped, c)

        # The path found has at most T + 1 edges.
        _, owner = lax.fori_loop(0, num_targets + 1, flip_until_start, (column, owner))
        return owner, u, v

    def maybe_add_row(row, state):
        return _where(valid[row], add_row(row, state), state)

    owner = jnp.full(num_queries + 1, num_targets, jnp.int32)
    u = jnp.zeros(num_targets + 1, jnp.float32)
    v = jnp.zeros(num_queries, jnp.float32)
    owner, _, _ = lax.fori_loop(0, num_targets, maybe_add_row, (owner, u, v))
    # Invert column -> row; unassigned columns (owner T) fall off the end.
    query_index = jnp.zeros(num_targets, jnp.int32).at[owner[:num_queries]].set(
        jnp.arange(num_queries, dtype=jnp.int32), mode="drop")
    return query_index, valid


def matcher_costs(class_logits: jax.Array, mask_logits: jax.Array, targets: dict,
                  point_coords: jax.Array, *, class_weight: float = 2.0,
                  mask_weight: float = 5.0, dice_weight: float = 5.0) -> jax.Array:
    """Mask2Former's matching cost `[Q, T]` for one image.

    Args:
      class_logits: `[Q, K + 1]` (last class = no object).
      mask_logits: `[Q, h, w]`.
      targets: one image's `labels [T] int`, `masks [T, H, W]` (bool or float).
      point_coords: `[P, 2]` (x, y) in [0, 1], shared by all predictions and targets.

    cost = class_weight * (-softmax(class)[target class]) + mask_weight * mean BCE over the
    points + dice_weight * (1 - (2 p.t + 1) / (sum p + sum t + 1)), with p = sigmoid(mask).
    """
    labels, masks = targets["labels"], targets["masks"]
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    cost_class = -jnp.take(probs, labels, axis=-1)
    pred = point_sample(mask_logits, point_coords)  # [Q, P]
    target = point_sample(masks, point_coords)  # [T, P]
    num_points = point_coords.shape[0]
    hi = lax.Precision.HIGHEST
    # BCE with logits against 1 and 0, paired through matmuls: sum_p bce(x, t) is linear in t.
    cost_mask = (jnp.matmul(jax.nn.softplus(-pred), target.T, precision=hi)
                 + jnp.matmul(jax.nn.softplus(pred), 1.0 - target.T, precision=hi)) / num_points
    prob = jax.nn.sigmoid(pred)
    numerator = 2.0 * jnp.matmul(prob, target.T, precision=hi)
    denominator = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice
