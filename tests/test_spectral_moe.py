"""SpectralMoE adapter against an independent PyTorch reference written from the equations.

The reference reads weights in the released naming (daxichen/SpectralMoE-main `DepthMoE`,
w1oves/Rein `LoRAReins`); our module gets the same weights through the converter, so every parity
test also tests `conversion/adapter.py`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from spectralmoe_jax.conversion.adapter import load_adapter
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE, routing_noise
from tests.conftest import relative_error

TINY = dict(num_layers=3, width=32, num_experts=4, rank=4, num_tokens=8, num_queries=8, query_dim=16)
BATCH, TOKENS, LAYER = 2, 20, 1
SPECTRAL, REIN = "backbone.depthmoe.", "backbone.reins."


# --- weights in the released naming --------------------------------------------------------

def released_state(config: AdapterConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random DepthMoE / LoRAReins state dict (no zero-initialised parts, so all paths count)."""
    rng = np.random.default_rng(seed)
    L, d, m, r, q, E = (config.num_layers, config.width, config.num_tokens, config.rank,
                        config.query_dim, config.num_experts)

    def normal(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    state = {}
    if config.kind == "rein":
        prefix = REIN
        state[prefix + "learnable_tokens_a"] = normal(L, m, r)
        state[prefix + "learnable_tokens_b"] = normal(L, r, d, std=0.5)
    else:
        prefix = SPECTRAL
        sets = E if config.use_moe else 1
        gates = 2 if (config.use_depth and config.dual_gating) else 1
        for layer in range(L):
            for e in range(sets):
                state[f"{prefix}experts_a.{layer}.{e}"] = normal(m, r)
                state[f"{prefix}experts_b.{layer}.{e}"] = normal(r, d, std=0.5)
            if config.use_moe:
                for j in range(gates):
                    state[f"{prefix}w_gate.{layer}.{j}"] = normal(d, E)
                    state[f"{prefix}w_noise.{layer}.{j}"] = normal(d, E, std=0.1)
        state[prefix + "mean"] = np.zeros(1, np.float32)
        state[prefix + "std"] = np.ones(1, np.float32)
    state[prefix + "scale"] = np.asarray(0.5, np.float32)
    for name, (n_in, n_out) in {
        "mlp_token2feat": (d, d), "mlp_delta_f": (d, d), "transform": (d, q), "merge": (3 * q, q)
    }.items():
        state[f"{prefix}{name}.weight"] = normal(n_out, n_in, std=1 / math.sqrt(n_in))
        state[f"{prefix}{name}.bias"] = normal(n_out, std=0.1)
    return state


# --- the reference, in float64 PyTorch, from the equations -----------------------------------

def t(x):
    return torch.tensor(np.array(x), dtype=torch.float64)


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def cv_squared(x):
    return torch.zeros((), dtype=torch.float64) if x.shape[0] == 1 else x.var() / (x.mean() ** 2 + 1e-10)


def ref_gate(f, w_gate, w_noise, k, p, eps):
    """Eq. 1-2 and the Shazeer load, on flattened tokens f [BN, d]."""
    E = w_gate.shape[1]
    clean = -torch.cdist(f, w_gate.T, p=p)
    if eps is not None:
        std = F.softplus(f @ w_noise) + 1e-2
        logits = clean + eps * std
    else:
        logits = clean
    top_values, top_index = logits.topk(min(k + 1, E), dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_index[:, :k], torch.softmax(top_values[:, :k], dim=1))
    if eps is not None and k < E:
        in_ = top_values[:, k:k + 1]
        out_ = top_values[:, k - 1:k]
        prob = torch.where(logits > in_, normal_cdf((clean - in_) / std), normal_cdf((clean - out_) / std))
        load = prob.sum(0)
    else:
        load = (gates > 0).sum(0).double()
    return gates, gates.sum(0), load, top_index[:, 0]


def ref_experts(f, gates, tokens, w_t, b_t):
    """Eq. 3-5: sum over experts of g_e * softmax(f T_e^T / sqrt d)[1:] (T_e[1:] W_T + b_T)."""
    out = torch.zeros_like(f)
    for e, T in enumerate(tokens):
        attn = torch.softmax(f @ T.T / math.sqrt(f.shape[-1]), dim=-1)
        out = out + gates[:, e:e + 1] * (attn[:, 1:] @ (T[1:] @ w_t.T + b_t))
    return out


def ref_fusion(dv, dd, fusion):
    d = dv.shape[-1]
    if fusion == "add":
        return dv + dd
    if fusion == "attention":  # Eq. 6
        return torch.softmax(dv @ dd.transpose(1, 2) / math.sqrt(d), dim=-1) @ dd
    attn = torch.softmax(torch.einsum("bnc,bmc->bnm", dd, dv) * d ** -0.5, dim=-1)  # released
    return torch.einsum("bnn,bnc->bnc", attn, dv)


def ref_spectral_moe(sd, config, layer, f_v, f_d, eps_v=None, eps_d=None):
    """One layer of DepthMoE (with the config's ablations), weights from state dict `sd`."""
    g = lambda name: t(sd[SPECTRAL + name])
    B, N, d = f_v.shape
    E = config.num_experts if config.use_moe else 1
    tokens = [g(f"experts_a.{layer}.{e}") @ g(f"experts_b.{layer}.{e}") for e in range(E)]
    w_t, b_t = g("mlp_token2feat.weight"), g("mlp_token2feat.bias")
    fv, fd = t(f_v).reshape(B * N, d), (None if f_d is None else t(f_d).reshape(B * N, d))

    loss, experts, deltas = 0.0, {}, {}
    modalities = [("v", fv, 0, eps_v)]
    if config.use_depth:
        modalities.append(("d", fd, 1 if config.dual_gating else 0, eps_d))
    for name, f, gate, eps in modalities:
        if config.use_moe:
            eps = None if eps is None else t(eps).reshape(B * N, E)
            gates, importance, load, top1 = ref_gate(
                f, g(f"w_gate.{layer}.{gate}"), g(f"w_noise.{layer}.{gate}"),
                config.top_k, config.gate_p, eps)
            terms = {"importance": importance, "load": load}
            loss = loss + sum(cv_squared(terms[k]) for k in config.balance_terms)
            experts[name] = top1.reshape(B, N).numpy()
        else:
            gates = torch.ones(B * N, 1, dtype=torch.float64)
        deltas[name] = ref_experts(f, gates, tokens, w_t, b_t).reshape(B, N, d)
    fused = ref_fusion(deltas["v"], deltas["d"], config.fusion) if config.use_depth else deltas["v"]
    f_v64 = t(f_v)
    mlp = (fused + f_v64) @ g("mlp_delta_f.weight").T + g("mlp_delta_f.bias")
    out = f_v64 + g("scale") * mlp
    return out.numpy(), config.balance_weight * config.balance_scale * float(loss), experts


def ref_rein(sd, layer, f_v):
    """reins.py `Reins.forward_delta_feat` with LoRAReins tokens."""
    g = lambda name: t(sd[REIN + name])
    T = g("learnable_tokens_a")[layer] @ g("learnable_tokens_b")[layer]
    f = t(f_v)
    attn = torch.softmax(torch.einsum("nbc,mc->nbm", f, T) * f.shape[-1] ** -0.5, dim=-1)
    delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], T[1:] @ g("mlp_token2feat.weight").T + g("mlp_token2feat.bias"))
    delta_f = (delta + f) @ g("mlp_delta_f.weight").T + g("mlp_delta_f.bias")
    return (f + g("scale") * delta_f).numpy()


def ref_queries(sd, config):
    """The released `return_auto` (link_token_to_query)."""
    prefix = REIN if config.kind == "rein" else SPECTRAL
    g = lambda name: t(sd[prefix + name])
    L = config.num_layers
    if config.kind == "rein":
        tokens = g("learnable_tokens_a") @ g("learnable_tokens_b")
    else:
        E = config.num_experts if config.use_moe else 1
        tokens = torch.stack([
            torch.stack([g(f"experts_a.{l}.{e}") @ g(f"experts_b.{l}.{e}") for e in range(E)]).mean(0)
            for l in range(L)])
    tokens = (tokens @ g("transform.weight").T + g("transform.bias")).permute(1, 2, 0)
    tokens = torch.cat([F.max_pool1d(tokens, kernel_size=L), F.avg_pool1d(tokens, kernel_size=L),
                        tokens[:, :, -1].unsqueeze(-1)], dim=-1)
    return (tokens.flatten(-2, -1) @ g("merge.weight").T + g("merge.bias")).numpy()


def inputs(seed=1, batch=BATCH, tokens=TOKENS, width=32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, tokens, width)).astype(np.float32),
            rng.standard_normal((batch, tokens, width)).astype(np.float32))


def run_ours(module, f_v, f_d, *, train, rng=None):
    out, aux = module(jnp.int32(LAYER), jnp.asarray(f_v), None if f_d is None else jnp.asarray(f_d),
                      train=train, rng=rng)
    return np.asarray(out), float(aux["balance_loss"]), np.asarray(aux["expert_v"]), np.asarray(aux["expert_d"])


def check_against_reference(config, train, seed=0):
    sd = released_state(config, seed)
    module = load_adapter(sd, config)
    f_v, f_d = inputs()
    rng = jax.random.key(7) if train else None
    eps_v = eps_d = None
    if train and config.use_moe:
        eps_v, eps_d = map(np.asarray, routing_noise(rng, LAYER, (BATCH, TOKENS, config.num_experts)))
    out, loss, expert_v, expert_d = run_ours(module, f_v, f_d if config.use_depth else None, train=train, rng=rng)
    ref_out, ref_loss, ref_experts = ref_spectral_moe(sd, config, LAYER, f_v, f_d, eps_v, eps_d)
    errors = {"out": relative_error(out, ref_out), "update": relative_error(out - f_v, ref_out - f_v)}
    if config.use_moe:
        errors["loss"] = abs(loss - ref_loss) / abs(ref_loss)
        np.testing.assert_array_equal(expert_v, ref_experts["v"])
        if config.use_depth:
            np.testing.assert_array_equal(expert_d, ref_experts["d"])
    else:
        assert loss == 0.0 and not expert_v.any() and not expert_d.any()
    # The update must be visible next to f_v, or the parity would say little.
    assert relative_error(out, f_v) > 1e-2
    return errors


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["attention", "diagonal"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_reference(fusion, top_k, train):
    errors = check_against_reference(AdapterConfig(**TINY, fusion=fusion, top_k=top_k), train)
    print(f"fusion={fusion} k={top_k} train={train}: {errors}")
    assert max(errors.values()) < 1e-5, errors


def test_laplacian_gating_p1_matches_reference():
    errors = check_against_reference(AdapterConfig(**TINY, gate_p=1.0, top_k=2), train=True)
    assert max(errors.values()) < 1e-5, errors


def test_rein_matches_reference():
    config = AdapterConfig(**TINY, kind="rein")
    sd = released_state(config)
    module = load_adapter(sd, config)
    f_v, _ = inputs()
    out, loss, expert_v, _ = run_ours(module, f_v, None, train=True, rng=None)
    assert relative_error(out, ref_rein(sd, LAYER, f_v)) < 1e-5
    assert loss == 0.0 and not expert_v.any()


@pytest.mark.parametrize("kind", ["spectral_moe", "rein"])
def test_query_embedding_matches_reference(kind):
    config = AdapterConfig(**TINY, kind=kind)
    sd = released_state(config)
    ours = np.asarray(load_adapter(sd, config).query_embedding())
    assert ours.shape == (config.num_queries, config.query_dim)
    assert relative_error(ours, ref_queries(sd, config)) < 1e-5
    assert SpectralMoE(AdapterConfig(**TINY, link_token_to_query=False), rngs=nnx.Rngs(0)).query_embedding() is None


def test_layer_index_is_traced_inside_scan():
    """The ViT calls the adapter inside `lax.scan`: every layer must match its reference."""
    config = AdapterConfig(**TINY)
    sd = released_state(config)
    module = load_adapter(sd, config)
    f_v, f_d = inputs()

    def body(x, layer):
        out, aux = module(layer, x, jnp.asarray(f_d), train=False)
        return out, aux["balance_loss"]

    out, losses = jax.lax.scan(body, jnp.asarray(f_v), jnp.arange(config.num_layers, dtype=jnp.int32))
    ref = f_v
    for layer in range(config.num_layers):
        ref, ref_loss, _ = ref_spectral_moe(sd, config, layer, ref.astype(np.float32), f_d)
        assert abs(float(losses[layer]) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert relative_error(out, ref) < 1e-5


# --- parameter counts (paper Table 3) -------------------------------------------------------

def count_params(config):
    module = nnx.eval_shape(lambda: SpectralMoE(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_counts_match_table3():
    L, d, E, r, m, q = 24, 1024, 6, 16, 100, 256
    linears = 2 * (d * d + d) + (d * q + q) + (3 * q * q + q)  # token2feat, delta_f, transform, merge
    released_moe = L * E * (m * r + r * d) + L * 2 * 2 * d * E + 1 + linears  # + w_gate/w_noise x 2
    released_rein = L * (m * r + r * d) + 1 + linears
    moe, rein = count_params(AdapterConfig()), count_params(AdapterConfig(kind="rein"))
    assert (moe, rein) == (released_moe, released_rein) == (5_737_985, 2_990_081)
    assert round(moe / 1e6, 2) == 5.74 and round(rein / 1e6, 2) == 2.99


# --- determinism ------------------------------------------------------------------------------

def test_evaluation_is_deterministic_and_training_is_noisy():
    config = AdapterConfig(**TINY, top_k=2)
    module = load_adapter(released_state(config), config)
    f_v, f_d = inputs()
    first, second = run_ours(module, f_v, f_d, train=False), run_ours(module, f_v, f_d, train=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    noisy = [run_ours(module, f_v, f_d, train=True, rng=jax.random.key(s))[0] for s in (0, 1)]
    assert not np.array_equal(noisy[0], noisy[1])
    with pytest.raises(ValueError, match="rng"):
        run_ours(module, f_v, f_d, train=True)
