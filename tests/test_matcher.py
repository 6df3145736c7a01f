"""Hungarian matcher vs scipy, matching cost vs HF `Mask2FormerHungarianMatcher`, point sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from transformers.models.mask2former import modeling_mask2former as hf

from spectralmoe_jax.training.mask2former_loss import semantic_to_targets
from spectralmoe_jax.training.matcher import hungarian_matching, matcher_costs
from spectralmoe_jax.training.point_sampling import point_sample
from tests.conftest import primitive_names, relative_error
from tests.test_mask2former_loss import _replay

_batched_matching = jax.jit(jax.vmap(hungarian_matching))


@pytest.mark.parametrize("num_queries, num_targets, integer_costs", [
    (100, 24, False),  # the real sizes
    (8, 8, True),      # square, many ties; with padding also Q > number of valid targets
    (6, 0, False),     # no targets at all
])
def test_hungarian_is_optimal(np_rng, num_queries, num_targets, integer_costs):
    n = 48
    shape = (n, num_queries, num_targets)
    if integer_costs:
        cost = np_rng.integers(0, 3, size=shape).astype(np.float32)
    else:
        scale = np_rng.uniform(0.1, 100, size=(n, 1, 1))
        cost = (np_rng.normal(size=shape) * scale).astype(np.float32)
    valid = np_rng.uniform(size=(n, num_targets)) < 0.7
    valid[0] = True
    valid[1] = False
    cost[2, 1] = np.nan  # a broken query is avoided (HF: non-finite costs only when forced)
    query_index, matched = _batched_matching(jnp.asarray(cost), jnp.asarray(valid))
    query_index, matched = np.asarray(query_index), np.asarray(matched)
    np.testing.assert_array_equal(matched, valid)
    for c, v, q in zip(cost, valid, query_index):
        tolerance = 1e-5 * np.abs(np.nan_to_num(c)).max(initial=1.0)
        c = np.where(np.isnan(c), 1e6, c).astype(np.float64)
        targets = np.flatnonzero(v)
        assert len(set(q[targets])) == len(targets), "two targets share a query"
        rows, cols = linear_sum_assignment(c[:, targets])
        best = c[rows, targets[cols]].sum()
        ours = c[q[targets], targets].sum()
        np.testing.assert_allclose(ours, best, rtol=1e-5, atol=tolerance)


@pytest.mark.parametrize("size", [12, 24])
def test_hungarian_long_augmenting_paths(size):
    """Costs i * j (and their reverse) make every new target re-route all earlier ones: the
    longest searches and path flips, which the fixed trip counts must still cover."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for cost in (i * j, (size - i) * j, np.abs(i - j) ** 2 - i * j):
        cost = cost.astype(np.float32)
        query_index, _ = jax.jit(hungarian_matching)(jnp.asarray(cost), jnp.ones(size, bool))
        rows, cols = linear_sum_assignment(cost)
        assert sorted(np.asarray(query_index).tolist()) == list(range(size))
        assert cost[np.asarray(query_index), np.arange(size)].sum() == cost[rows, cols].sum()


def test_hungarian_has_no_data_dependent_control_flow():
    """No while loop with a computed end and no cond: on a GPU each would read its predicate
    on the host once per iteration inside the training step."""
    names = set(primitive_names(hungarian_matching, jnp.zeros((100, 24)), jnp.ones(24, bool)))
    assert "scan" in names
    assert not names & {"while", "cond"}, names


def test_hungarian_rejects_more_targets_than_queries():
    with pytest.raises(ValueError, match="Q >= T"):
        hungarian_matching(jnp.zeros((3, 4)), jnp.ones(4, bool))


def test_point_sample_matches_grid_sample(np_rng):
    maps = np_rng.normal(size=(2, 3, 16, 24)).astype(np.float32)
    coords = np_rng.uniform(size=(500, 2)).astype(np.float32)
    coords[:6] = [[0, 0], [1, 1], [0, 1], [1, 0], [0.01, 0.99], [0.5, 0.5]]  # borders: zero padding
    ours = jax.jit(point_sample)(jnp.asarray(maps), jnp.asarray(coords))
    grid = torch.from_numpy(2 * coords - 1)[None, :, None].expand(2, -1, -1, -1)
    reference = torch.nn.functional.grid_sample(torch.from_numpy(maps), grid,
                                                align_corners=False)[..., 0]
    assert ours.shape == (2, 3, 500)
    assert relative_error(ours, reference.numpy()) < 1e-6
    # Boolean masks are sampled as 0/1 floats.
    bool_maps = maps > 0
    ours = jax.jit(point_sample)(jnp.asarray(bool_maps), jnp.asarray(coords))
    reference = hf.sample_point(torch.from_numpy(bool_maps).float(),
                                torch.from_numpy(coords)[None].expand(2, -1, -1),
                                align_corners=False)
    assert relative_error(ours, reference.numpy()) < 1e-6


def _label_maps(np_rng, present, shape):
    """Random label maps with the given classes per image and an ignore (255) band."""
    labels = []
    for classes in present:
        label = np.asarray(classes)[np_rng.integers(0, len(classes), size=shape)]
        label[: shape[0] // 8] = 255
        labels.append(label)
    return np.stack(labels).astype(np.int32)


def test_matcher_parity_with_hf(np_rng, monkeypatch):
    num_queries, num_classes, num_points = 8, 5, 12544
    present = [[0, 2, 4], [1, 2, 3]]
    label = _label_maps(np_rng, present, (64, 96))
    class_logits = (2 * np_rng.normal(size=(2, num_queries, num_classes + 1))).astype(np.float32)
    mask_logits = (3 * np_rng.normal(size=(2, num_queries, 16, 24))).astype(np.float32)
    coords = np_rng.uniform(size=(2, num_points, 2)).astype(np.float32)

    targets = semantic_to_targets(jnp.asarray(label), num_classes)

    @jax.jit
    def ours(class_logits, mask_logits, targets, coords):
        cost = jax.vmap(matcher_costs)(class_logits, mask_logits, targets, coords)
        return cost, jax.vmap(hungarian_matching)(cost, targets["valid"])[0]

    cost, query_index = ours(class_logits, mask_logits, targets, coords)

    draws = [torch.from_numpy(c)[None] for c in coords]
    monkeypatch.setattr(torch, "rand", _replay(draws))
    hf_costs = []

    def capture(cost_matrix):
        hf_costs.append(cost_matrix.numpy())
        return linear_sum_assignment(cost_matrix)

    monkeypatch.setattr(hf, "linear_sum_assignment", capture)
    matcher = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0,
                                             num_points=num_points)
    indices = matcher(torch.from_numpy(mask_logits), torch.from_numpy(class_logits),
                      [torch.from_numpy(label[b] == np.asarray(c)[:, None, None]).float()
                       for b, c in enumerate(present)],
                      [torch.tensor(c) for c in present])
    assert not draws
    for b, classes in enumerate(present):
        err = relative_error(np.asarray(cost[b])[:, classes], hf_costs[b])
        print(f"image {b}: cost relative error {err:.2e}")
        assert err < 1e-5
        hf_query, hf_target = (i.numpy() for i in indices[b])
        np.testing.assert_array_equal(np.asarray(query_index[b])[np.asarray(classes)[hf_target]],
                                      hf_query)
