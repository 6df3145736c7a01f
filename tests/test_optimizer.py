"""The released optimiser: AdamW with parameter-wise decay, poly schedule, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spectralmoe_jax.run_config import NO_DECAY_KEYS, TrainConfig
from spectralmoe_jax.training.optimizer import decay_mask, make_optimizer, poly_schedule


def train_config(**changes):
    config = dict(learning_rate=1e-3, num_steps=10, poly_power=0.9, weight_decay=0.05,
                  no_decay_keys=NO_DECAY_KEYS, clip_grad_norm=0.0, grad_accum_steps=1)
    config.update(changes)
    return TrainConfig(**config)


PARAMS = {"adapter": {"experts_a": jnp.ones((2, 3)), "mlp_delta_f": {"kernel": jnp.ones((3, 3))},
                      "scale": jnp.ones(())},
          "head": {"norm": {"scale": jnp.ones(3)}, "query_feat": jnp.ones((4, 3)),
                   "proj": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)}}}


def test_poly_schedule_is_mmengine_polylr():
    schedule = poly_schedule(1e-4, 100, 0.9)
    for t in (0, 1, 50, 99, 100):
        assert np.isclose(schedule(t), 1e-4 * (1 - t / 100) ** 0.9, rtol=1e-6, atol=1e-12)


def test_decay_applies_only_outside_the_released_keys():
    mask = decay_mask(PARAMS, NO_DECAY_KEYS)
    assert mask["adapter"]["mlp_delta_f"]["kernel"] and mask["head"]["proj"]["kernel"]
    assert mask["head"]["proj"]["bias"]  # mmseg decays biases unless a key names them
    for off in (mask["adapter"]["experts_a"], mask["adapter"]["scale"],
                mask["head"]["norm"]["scale"], mask["head"]["query_feat"]):
        assert not off


def test_adamw_step_matches_the_equations():
    tx, _ = make_optimizer(train_config(), PARAMS)
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    # First AdamW step: p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), m_hat = g, v_hat = g^2.
    step = 0.5 / (0.5 + 1e-8)
    np.testing.assert_allclose(new["head"]["proj"]["kernel"], 2.0 - 1e-3 * (step + 0.05 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(new["adapter"]["experts_a"], 1.0 - 1e-3 * step, rtol=1e-6)


def test_gradient_accumulation_equals_one_step_on_the_mean_gradient():
    rng = np.random.default_rng(0)
    g1, g2 = (jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), PARAMS)
              for _ in range(2))
    plain, _ = make_optimizer(train_config(), PARAMS)
    updates, _ = plain.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), plain.init(PARAMS), PARAMS)
    expected = optax.apply_updates(PARAMS, updates)

    accumulating, _ = make_optimizer(train_config(grad_accum_steps=2), PARAMS)
    state, params = accumulating.init(PARAMS), PARAMS
    for grads in (g1, g2):
        updates, state = accumulating.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
