"""SpectralMoE adapter: gradients of the balance loss, the Table 4 ablations, converter errors.

The PyTorch reference lives in test_spectral_moe.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectralmoe_jax.conversion.adapter import load_adapter
from spectralmoe_jax.conversion.rules import ConversionError
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE, routing_noise
from tests.conftest import relative_error
from tests.test_spectral_moe import (
    BATCH, LAYER, SPECTRAL, TINY, TOKENS, check_against_reference, cv_squared, inputs, ref_gate,
    released_state, run_ours, t)


# --- gradients -------------------------------------------------------------------------------

@nnx.grad
def balance_loss_grad(module, f_v, f_d, rng):
    return module(jnp.int32(LAYER), f_v, f_d, train=True, rng=rng)[1]["balance_loss"]


def test_gates_learn_from_balance_loss_alone_with_top1():
    """With k = 1 every gate is 1 (importance has no gradient): the load term must carry it."""
    config = AdapterConfig(**TINY, top_k=1)
    f_v, f_d = map(jnp.asarray, inputs())
    rng = jax.random.key(3)
    module = SpectralMoE(config, rngs=nnx.Rngs(0))  # released init: gates zero
    grads = balance_loss_grad(module, f_v, f_d, rng)
    for name in ("w_gate", "w_noise"):
        g = np.asarray(grads[name][...])
        assert np.isfinite(g).all()
        assert np.abs(g[LAYER, 0]).max() > 0 and np.abs(g[LAYER, 1]).max() > 0, name
        assert np.abs(np.delete(g, LAYER, axis=0)).max() == 0  # other layers untouched

    importance_only = SpectralMoE(AdapterConfig(**TINY, top_k=1, balance_terms=("importance",)), rngs=nnx.Rngs(0))
    g = balance_loss_grad(importance_only, f_v, f_d, rng)
    assert np.abs(np.asarray(g["w_gate"][...])).max() == 0  # the paper's loss alone cannot train k=1 gates

    # The gradient equals PyTorch autograd of the reference loss, for random gates.
    sd = released_state(config)
    ours = balance_loss_grad(load_adapter(sd, config), f_v, f_d, rng)
    eps_v, eps_d = map(np.asarray, routing_noise(rng, LAYER, (BATCH, TOKENS, config.num_experts)))
    sd64 = {k: t(v).requires_grad_(k.startswith(SPECTRAL + "w_")) for k, v in sd.items()}
    loss = 0.0
    for j, (f, eps) in enumerate([(f_v, eps_v), (f_d, eps_d)]):
        _, importance, load, _ = ref_gate(
            t(f).reshape(-1, 32), sd64[f"{SPECTRAL}w_gate.{LAYER}.{j}"], sd64[f"{SPECTRAL}w_noise.{LAYER}.{j}"],
            1, 2.0, t(eps).reshape(-1, config.num_experts))
        loss = loss + cv_squared(importance) + cv_squared(load)
    (1e3 * loss).backward()
    for name in ("w_gate", "w_noise"):
        for j in range(2):
            ref = sd64[f"{SPECTRAL}{name}.{LAYER}.{j}"].grad.numpy()
            assert relative_error(np.asarray(ours[name][...])[LAYER, j], ref) < 1e-4, (name, j)


# --- ablations: each switch changes exactly what it names ------------------------------------

def param_shapes(config):
    module = nnx.eval_shape(lambda: SpectralMoE(config, rngs=nnx.Rngs(0)))
    state = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {"/".join(map(str, k)): v.shape for k, v in state}


def test_without_depth():
    config = AdapterConfig(**TINY, use_depth=False, top_k=2)
    errors = check_against_reference(config, train=True)
    assert max(errors.values()) < 1e-5, errors
    module = load_adapter(released_state(config), config)
    f_v, f_d = inputs()
    without, with_depth = run_ours(module, f_v, None, train=False), run_ours(module, f_v, f_d, train=False)
    np.testing.assert_array_equal(without[0], with_depth[0])  # f_d is ignored
    full, ablated = param_shapes(AdapterConfig(**TINY)), param_shapes(config)
    assert {k for k in full if full[k] != ablated.get(k)} == {"w_gate", "w_noise"}  # one gate left
    assert ablated["w_gate"][1] == 1


def test_without_dual_gating():
    config = AdapterConfig(**TINY, dual_gating=False, top_k=2)
    errors = check_against_reference(config, train=True)
    assert max(errors.values()) < 1e-5, errors
    full, ablated = param_shapes(AdapterConfig(**TINY)), param_shapes(config)
    assert {k for k in full if full[k] != ablated[k]} == {"w_gate", "w_noise"}
    # With both gates of the full model set to the shared one, the two agree exactly.
    sd = released_state(config)
    full_sd = dict(sd)
    for layer in range(config.num_layers):
        for name in ("w_gate", "w_noise"):
            full_sd[f"{SPECTRAL}{name}.{layer}.1"] = sd[f"{SPECTRAL}{name}.{layer}.0"]
    f_v, f_d = inputs()
    shared = run_ours(load_adapter(sd, config), f_v, f_d, train=True, rng=jax.random.key(0))
    dual = run_ours(load_adapter(full_sd, AdapterConfig(**TINY, top_k=2)), f_v, f_d, train=True, rng=jax.random.key(0))
    for a, b in zip(shared, dual):
        np.testing.assert_array_equal(a, b)


def test_without_moe():
    config = AdapterConfig(**TINY, use_moe=False)
    errors = check_against_reference(config, train=True)
    assert max(errors.values()) < 1e-5, errors
    ablated = param_shapes(config)
    assert "w_gate" not in ablated and ablated["experts_a"][1] == 1 and ablated["experts_b"][1] == 1
    # One expert without gating = a routed module with a single expert (its gate is always 1).
    sd = released_state(config)
    routed_sd = dict(sd)
    for layer in range(config.num_layers):
        for j in range(2):
            routed_sd[f"{SPECTRAL}w_gate.{layer}.{j}"] = np.zeros((32, 1), np.float32)
            routed_sd[f"{SPECTRAL}w_noise.{layer}.{j}"] = np.zeros((32, 1), np.float32)
    f_v, f_d = inputs()
    single = run_ours(load_adapter(sd, config), f_v, f_d, train=False)
    routed = run_ours(load_adapter(routed_sd, AdapterConfig(**{**TINY, "num_experts": 1})), f_v, f_d, train=False)
    np.testing.assert_allclose(single[0], routed[0], rtol=0, atol=1e-6)


def test_without_cross_attention():
    config = AdapterConfig(**TINY, fusion="add")
    errors = check_against_reference(config, train=False)
    assert max(errors.values()) < 1e-5, errors
    assert param_shapes(config) == param_shapes(AdapterConfig(**TINY))


def test_balance_weight_and_terms():
    f_v, f_d = inputs()
    sd = released_state(AdapterConfig(**TINY))
    base = run_ours(load_adapter(sd, AdapterConfig(**TINY)), f_v, f_d, train=False)
    halved = run_ours(load_adapter(sd, AdapterConfig(**TINY, balance_weight=0.5)), f_v, f_d, train=False)
    np.testing.assert_array_equal(base[0], halved[0])
    assert halved[1] == pytest.approx(0.5 * base[1], rel=1e-6)
    config = AdapterConfig(**TINY, balance_terms=("importance",), top_k=2)
    errors = check_against_reference(config, train=True)
    assert max(errors.values()) < 1e-5, errors


# --- converter and config errors -------------------------------------------------------------

def test_converter_reports_bad_checkpoints():
    config = AdapterConfig(**TINY)
    sd = released_state(config)
    missing = {k: v for k, v in sd.items() if k != SPECTRAL + "experts_b.2.3"}
    with pytest.raises(ConversionError, match="experts_b"):
        load_adapter(missing, config)
    with pytest.raises(ConversionError, match="depthmoe.surprise"):
        load_adapter({**sd, SPECTRAL + "surprise": np.zeros(1)}, config)
    with pytest.raises(ConversionError, match="experts_a"):
        load_adapter(sd, AdapterConfig(**{**TINY, "rank": 5}))
    with pytest.raises(ConversionError, match="no spectral_moe adapter keys"):
        load_adapter({"decode_head.x": np.zeros(1)}, config)
    # The frozen backbone's and the decoder's keys are not the adapter's business.
    load_adapter({**sd, "decode_head.query_feat.weight": np.zeros(3)}, config)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="fusion"):
        AdapterConfig(fusion="concat")
    with pytest.raises(ValueError, match="top_k"):
        AdapterConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_queries"):
        AdapterConfig(num_queries=50)
    module = SpectralMoE(AdapterConfig(**TINY), rngs=nnx.Rngs(0))
    f_v, f_d = inputs()
    with pytest.raises(ValueError, match="f_d is None"):
        run_ours(module, f_v, None, train=False)
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        run_ours(module, f_v[..., :16], f_d, train=False)
