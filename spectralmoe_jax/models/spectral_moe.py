"""SpectralMoE: the dual-gated mixture-of-experts adapter (paper Eq. 1-7, 10-11), REIN, ablations.

One module holds the adapter of every layer of the frozen ViT: per-layer parameters are stacked
with a leading layer axis and sliced with a traced `layer_index`, so the module runs as the ViT's
hook inside its `jax.lax.scan` over blocks (contract in docs/design.md). It refines patch tokens
only; prefix tokens never reach it.

Per layer l and modality j in {v (visual), d (depth)}:
  Eq. 1   h_e = -||f - w_gate,e||_p + eps_e * (softplus(f . w_noise,e) + noise_epsilon)
  Eq. 2   g = softmax over the top-k logits, zero elsewhere
  Eq. 3-4 dz_e = softmax(f T_e^T / sqrt d)[1:] (T_e[1:] W_T + b_T),   T_e = A_e B_e
  Eq. 5   df^j = sum_e g_e dz_e
  Eq. 6   F = softmax(df^v df^d^T / sqrt d) df^d            (fusion='attention', the paper)
  Eq. 7   f_v_out = f_v + alpha * MLP(F + f_v)

Where the paper is silent the released code (daxichen/SpectralMoE-main,
`models/backbones/depthmoe.py`, class `DepthMoE`) decides: Euclidean distance (torch.cdist, p=2),
1e-2 added to the noise std, the Shazeer et al. load term in the balance loss, and every
initialisation. Both paths keep the released attention sink (token 0 enters the softmax and
gives no value; Eq. 4 as printed sums all m tokens). REIN is w1oves/Rein `LoRAReins`.

Where the released code departs from the paper, `AdapterConfig.compat` chooses (docs/released_code.md
lists every point side by side):
  'paper'     Eq. 3-6 as written: the default for training from scratch.
  'released'  what `DepthMoE.forward_delta_feat` computes, and what its one published checkpoint
              was trained with: the expert attention `einsum("bc,td->bt", x, T_e)` sums the channel
              indices apart, logit_t = (sum_c f_c)(sum_d T_e[t, d]) / sqrt d (rank one per expert);
              `SparseDispatcher.combine` without `multiply_by_gates` gives
              df = log sum_{e: g_e > 0} exp(dz_e) per channel (= dz_e for k = 1), ungated; the
              fusion is the diagonal form. Loading released weights selects it
              (`conversion/adapter.py: implied_settings`).

Experts are tiny (m x r and r x d) and few, so every expert runs densely on every token and the
gates (zero off the top-k) select: no capacity, no token dropping, nothing data-dependent in the
shapes, and all einsums keep the batch and token axes free so a mesh can shard them.

Every expert adjustment is a combination of the K = Ne r + 1 rows of U = [B_e W_T; b_T]
(`expert_basis`), so Eq. 4-6 run on K coordinates per token instead of d: at ViT-L size the N x N
fusion attention costs 97 instead of 1024 per entry. The results are the equations' exactly, up
to floating-point reassociation. The released combine for k >= 2 is non-linear per channel, so
that one path forms the d-wide adjustments of its k selected experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectralmoe_jax import sharding

# SpectralMoE and REIN live here; the other methods of the paper's Table 3 in models/adapters/.
KINDS = ("spectral_moe", "rein", "set", "fada", "depthforge", "lora", "adaptformer", "vpt")
IN_BLOCK_KINDS = ("lora", "adaptformer", "vpt")  # inside the frozen blocks: no tokens
COMPATS = ("paper", "released")
FUSIONS = ("attention", "diagonal", "add")
BALANCE_TERMS = ("importance", "load")
# SparseDispatcher.combine replaces exact zeros by numpy's float eps before the log.
_RELEASED_COMBINE_FLOOR = float(np.finfo(np.float64).eps)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The adapter's hyper-parameters; defaults are the released DINOv3 ViT-L configuration.

    `compat` picks the math where the released `DepthMoE` departs from the paper:

      point            compat='paper' (default)            compat='released'
      expert logits    f . T_e[t] / sqrt d  (Eq. 3)        (sum_c f_c)(sum_d T_e[t, d]) / sqrt d
      expert combine   sum_e g_e dz_e  (Eq. 5)             log sum_{e: g_e > 0} exp(dz_e), ungated
      fusion (None)    'attention'  (Eq. 6)                'diagonal'
      gate_p           any p > 0 (Eq. 1)                   2 (torch.cdist, `gating='laplace'`)

    None (unset) resolves to 'paper' when the model is built from scratch; loading or converting
    released weights (`backbone.depthmoe.*`) implies 'released' (`conversion/adapter.py:
    implied_settings`), unless the config sets `compat`. REIN (`kind='rein'`) has one form: the
    released `LoRAReins`, whatever `compat` says.
    """

    kind: str = "spectral_moe"  # one of KINDS (docs/methods.md)
    compat: str | None = None  # 'paper' | 'released' | None: by the weights (see above)
    num_layers: int = 24  # VFM blocks refined (one adapter layer after each)
    width: int = 1024  # d: token width (the VFM's)
    num_experts: int = 6  # Ne: experts per layer
    top_k: int = 1  # experts per token (Eq. 2)
    rank: int = 16  # r of T_e = A_e B_e
    num_tokens: int = 100  # m: tokens per expert
    gate_p: float = 2.0  # p of Eq. 1; 2 as released (torch.cdist), 1 is Laplacian gating
    noise_epsilon: float = 1e-2  # added to the noise std, as released
    # 'attention' (Eq. 6) | 'diagonal' (released) | 'add' (w/o cross-attn) | None (by compat)
    fusion: str | None = None
    use_depth: bool = True  # False: w/o depth feature
    dual_gating: bool = True  # False: one gate shared by both modalities
    use_moe: bool = True  # False: one expert, no gating (w/o MoE)
    balance_weight: float = 1.0  # lambda of Eq. 9
    balance_scale: float = 1e3  # the released `loss_coef`
    balance_terms: tuple[str, ...] = BALANCE_TERMS  # cv^2 terms per modality, as released
    scale_init: float = 1e-3  # alpha of Eq. 7
    query_dim: int = 256  # width of the decoder queries the expert tokens initialise
    num_queries: int = 100  # decoder queries made from the tokens (= num_tokens when linked)
    # Released `link_token_to_query`: tokens -> query positions. None: as the kind was released
    # (the token methods link; LoRA / AdaptFormer / VPT have no tokens and keep the plain head's
    # learned queries).
    link_token_to_query: bool | None = None
    patch_size: int = 16  # only the token initialisations (REIN's family, VPT) use it
    # The other methods (models/adapters/; defaults give Table 3's counts on ViT-L).
    lora_rank: int = 8  # LoRA r; delta (alpha / r) x A B on each target
    lora_alpha: float = 8.0  # peft's default (= r)
    lora_targets: tuple[str, ...] = ("q", "v")  # q, k, v | qkv (fused), proj, fc1, fc2 | w1, w2, w3
    lora_dropout: float = 0.0  # on the targets' input, in training
    adaptformer_bottleneck: int = 64  # AdaptFormer's hidden width (down d -> this -> up d)
    adaptformer_scale: float = 0.1  # s of the parallel branch (the released image config)
    adaptformer_layernorm: str = "in"  # 'in' (before down) | 'out' (after up) | 'none'
    adaptformer_dropout: float = 0.1  # on the bottleneck, in training
    vpt_tokens: int = 150  # VPT-deep prompts per block
    vpt_dropout: float = 0.0  # on the prompts, in training (VPT's default 0)
    # SET and FADA as released transform across the samples of a GPU's batch (SET's FFT over the
    # batch axis, FADA's reshapes): how many samples share one transform in training (released
    # batch 4 per GPU) and in evaluation (mmseg tests one image at a time).
    sample_group_train: int = 4  # samples sharing one SET / FADA transform in training
    sample_group_eval: int = 1  # the same in evaluation (mmseg tests one image at a time)
    dtype: Any = jnp.float32  # compute dtype; parameters are float32, the router always float32

    def __post_init__(self):
        # ml_collections hands over lists; the config must stay hashable (static under jit).
        object.__setattr__(self, "balance_terms", tuple(self.balance_terms))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind={self.kind!r}: expected one of {KINDS}")
        if self.compat not in (*COMPATS, None):
            raise ValueError(f"AdapterConfig.compat={self.compat!r}: expected None or one of {COMPATS}")
        compat = self.compat or "paper"
        object.__setattr__(self, "compat", compat)
        if self.fusion is None:
            object.__setattr__(self, "fusion", "diagonal" if compat == "released" else "attention")
        if self.fusion not in FUSIONS:
            raise ValueError(f"AdapterConfig.fusion={self.fusion!r}: expected None or one of {FUSIONS}")
        if self.released and self.fusion == "attention":
            raise ValueError(
                "AdapterConfig: compat='released' runs the released DepthMoE, whose fusion is the "
                "diagonal form; fusion='attention' is the paper's Eq. 6. Leave fusion unset or set "
                "'diagonal' (or 'add', the w/o cross-attention ablation), or compat='paper'")
        if self.released and self.gate_p != 2:
            raise ValueError(
                f"AdapterConfig: compat='released' gates with torch.cdist (p = 2), but "
                f"gate_p={self.gate_p}; set gate_p=2 or compat='paper'")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"AdapterConfig.top_k={self.top_k}: needs 1 <= top_k <= num_experts={self.num_experts}"
            )
        if not set(self.balance_terms) <= set(BALANCE_TERMS):
            raise ValueError(
                f"AdapterConfig.balance_terms={self.balance_terms!r}: allowed {BALANCE_TERMS}"
            )
        if self.gate_p <= 0:
            raise ValueError(f"AdapterConfig.gate_p={self.gate_p}: must be positive")
        if self.link_token_to_query is None:
            object.__setattr__(self, "link_token_to_query", self.kind not in IN_BLOCK_KINDS)
        if self.link_token_to_query and self.num_queries != self.num_tokens:
            raise ValueError(
                f"AdapterConfig: link_token_to_query makes one query per token, but "
                f"num_queries={self.num_queries} != num_tokens={self.num_tokens}"
            )

    @property
    def released(self) -> bool:
        """Whether the released DepthMoE math runs (SpectralMoE with compat='released')."""
        return self.kind == "spectral_moe" and self.compat == "released"

    @property
    def routed(self) -> bool:
        """Whether tokens are routed among several experts (SpectralMoE with MoE)."""
        return self.kind == "spectral_moe" and self.use_moe

    @property
    def depth(self) -> bool:
        """Whether the depth tokens take part (SpectralMoE with depth)."""
        return self.kind == "spectral_moe" and self.use_depth

    @property
    def token_sets(self) -> int:
        """Number of expert token sets T_e per layer (1 for REIN and w/o MoE)."""
        return self.num_experts if self.routed else 1

    @property
    def num_gates(self) -> int:
        """Gating networks per layer: one per modality, one shared, or none."""
        if not self.routed:
            return 0
        return 2 if self.depth and self.dual_gating else 1


class Routing(NamedTuple):
    """Eq. 1-2 for one modality, and what the balance loss needs."""

    gates: jax.Array  # [B, N, E] float32, softmax over the top-k logits, zero elsewhere
    top: jax.Array  # [B, N, k] int32, the selected experts, best first
    expert: jax.Array  # [B, N] int32, the top-1 expert
    importance: jax.Array  # [E] sum of gates over all tokens (Eq. 11)
    load: jax.Array  # [E] smooth load (training with noise) or count of tokens routed


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _torch_linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear with PyTorch's default init: kernel and bias both U(+-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        kernel_init=_uniform(bound),
        bias_init=_uniform(bound),
        rngs=rngs,
    )


def _at_layer(stacked: jax.Array, layer_index) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked, layer_index, axis=0, keepdims=False)


def routing_noise(rng: jax.Array, layer_index, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The eps ~ N(0, 1) of Eq. 1 for the visual and the depth gate, each of `shape` [B, N, E].

    The layer index is folded into `rng`, so the caller may pass one key to every layer.
    """
    key_v, key_d = jax.random.split(jax.random.fold_in(rng, layer_index))
    return jax.random.normal(key_v, shape), jax.random.normal(key_d, shape)


def _distance(f: jax.Array, w: jax.Array, p: float) -> jax.Array:
    """||f - w_e||_p for f [B, N, d] and prototypes w [d, E] -> [B, N, E]."""
    if p == 2:
        # The matmul expansion (torch.cdist does the same for large inputs) avoids a [B, N, d, E]
        # difference tensor.
        squared = (
            jnp.sum(f * f, axis=-1, keepdims=True)
            - 2.0 * jnp.einsum("bnd,de->bne", f, w)
            + jnp.sum(w * w, axis=0)
        )
        # The floor keeps the gradient finite where a token sits on a prototype.
        return jnp.sqrt(jnp.maximum(squared, 1e-30))
    diff = jnp.abs(f[..., None] - w)
    return jnp.sum(diff**p, axis=-2) ** (1.0 / p)


def route(
    f: jax.Array,
    w_gate: jax.Array,
    w_noise: jax.Array,
    *,
    top_k: int,
    p: float,
    noise_epsilon: float,
    eps: jax.Array | None = None,
) -> Routing:
    """Eq. 1-2: distance-based noisy top-k gating, in float32; `eps` None means clean (eval).

    The load follows the released `_prob_in_top_k` (Shazeer et al. 2017): with noise, the
    probability that each expert stays in the top-k, the Normal CDF of the clean logit against
    the (k+1)-th noisy logit (or the k-th for experts now in the top-k), which is differentiable;
    without noise, or when k = Ne, `_gates_to_load`: the count of tokens whose gate for the expert
    is > 0 (a selected gate that underflows to 0 in the softmax does not count).
    """
    f = f.astype(jnp.float32)
    num_experts = w_gate.shape[-1]
    clean = -_distance(f, w_gate, p)
    if eps is None:
        logits, std = clean, None
    else:
        std = jax.nn.softplus(jnp.einsum("bnd,de->bne", f, w_noise)) + noise_epsilon
        logits = clean + eps * std
    top_values, top_index = jax.lax.top_k(logits, min(top_k + 1, num_experts))
    # A comparison rather than jax.nn.one_hot: the same mask, and it exports to ONNX (whose
    # runtimes have no boolean OneHot).
    selected = (top_index[..., :top_k, None] == jnp.arange(num_experts)).any(axis=-2)
    gates = jax.nn.softmax(jnp.where(selected, logits, -jnp.inf), axis=-1)
    importance = jnp.sum(gates, axis=(0, 1))
    if std is not None and top_k < num_experts:
        threshold_in = top_values[..., top_k, None]  # the (k+1)-th noisy logit
        threshold_out = top_values[..., top_k - 1, None]  # the k-th
        prob = jnp.where(
            logits > threshold_in,
            jax.scipy.stats.norm.cdf((clean - threshold_in) / std),
            jax.scipy.stats.norm.cdf((clean - threshold_out) / std),
        )
        load = jnp.sum(prob, axis=(0, 1))
    else:
        load = jnp.sum(gates > 0, axis=(0, 1)).astype(jnp.float32)
    top_index = top_index.astype(jnp.int32)
    return Routing(gates, top_index[..., :top_k], top_index[..., 0], importance, load)


def cv_squared(x: jax.Array) -> jax.Array:
    """Squared coefficient of variation, as released: unbiased variance / (mean^2 + 1e-10)."""
    if x.shape[0] == 1:
        return jnp.zeros((), jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.var(x, ddof=1) / (jnp.mean(x) ** 2 + 1e-10)


def expert_basis(b: jax.Array, w_t: jax.Array, bias: jax.Array) -> jax.Array:
    """U = [B_e W_T for every expert e; b_T]: [K, d] with K = E r + 1.

    T_e[1:] W_T + b_T = A_e[1:] (B_e W_T) + b_T, so every expert adjustment of Eq. 4-5, and
    hence everything Eq. 6 mixes, is a combination of the K rows of U: the adapter carries
    coordinates z [B, N, K] with df = z U and forms d-wide vectors only in Eq. 7.
    """
    rows = jnp.einsum("erd,dk->erk", b, w_t).reshape(-1, w_t.shape[-1])
    return jnp.concatenate([rows, bias[None]], axis=0)


def expert_logits(f: jax.Array, a: jax.Array, b: jax.Array, *, released: bool) -> jax.Array:
    """Attention logits of every token on every expert's tokens: [B, N, E, m] float32.

    Paper (Eq. 3): f . T_e[t] / sqrt d, with f T_e^T = (f B_e^T) A_e^T so nothing of size m x d
    is formed. Released: `einsum("bc,td->bt", x, T_e)` names the channel axis twice apart, so it
    sums each side alone: (sum_c f_c)(sum_d T_e[t, d]) / sqrt d, with sum_d T_e[t, d] =
    A_e[t] . (B_e 1). A rank-one outer product: O(d) per token plus O(E m), no projection.
    """
    scale = 1.0 / math.sqrt(f.shape[-1])
    if released:
        token_sums = jnp.einsum("emr,er->em", a.astype(jnp.float32), jnp.sum(b, axis=-1))
        channel_sums = jnp.sum(f.astype(jnp.float32), axis=-1)
        return channel_sums[..., None, None] * token_sums * scale
    dtype = f.dtype
    # On a mesh with an expert axis each device computes its experts (the parameters' layout
    # alone partitions these einsums; the constraints pin it).
    projected = jnp.einsum("bnd,erd->bner", f, b.astype(dtype))
    projected = sharding.constrain(projected, "batch", None, "experts", None)
    logits = jnp.einsum("bner,emr->bnem", projected, a.astype(dtype))
    return logits.astype(jnp.float32) * scale


def expert_coordinates(logits: jax.Array, weights: jax.Array, a: jax.Array, dtype) -> jax.Array:
    """Eq. 4-5 for all experts densely, weighted per expert, as coordinates in `expert_basis`.

    logits [B, N, E, m] from `expert_logits`; weights [B, N, E] (the gates; for one expert of the
    released combine, its selection mask). Token 0 is an attention sink: it takes part in the
    softmax and gives no value. Returns z [B, N, E r + 1]: the weighted attention mass on
    A_e[1:] per expert, then the total mass (the coefficient of b_T).
    """
    attn = jax.nn.softmax(logits, axis=-1)[..., 1:] * weights[..., None]
    attn = attn.astype(dtype)
    mixed = jnp.einsum("bnem,emr->bner", attn, a[:, 1:].astype(dtype))
    mixed = sharding.constrain(mixed, "batch", None, "experts", None)
    mass = jnp.sum(attn, axis=(-2, -1))[..., None]
    return jnp.concatenate([mixed.reshape(*mixed.shape[:2], -1), mass], axis=-1)


def released_combine(logits: jax.Array, routing: Routing, a: jax.Array, basis: jax.Array) -> jax.Array:
    """`SparseDispatcher.combine(expert_outputs)` without `multiply_by_gates`: [B, N, d] float32.

    Each token gets log(sum over its experts with gate > 0 of exp(dz_e)) per channel, the sum
    in float32 and an exact zero replaced by numpy's float eps before the log, as released. Not
    linear, so the k selected experts' adjustments are formed d-wide (one slot at a time).
    """
    num_experts = logits.shape[2]
    total = jnp.zeros((*logits.shape[:2], basis.shape[-1]), jnp.float32)
    for slot in range(routing.top.shape[-1]):
        expert = routing.top[..., slot]
        one_hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32)
        dispatched = jnp.take_along_axis(routing.gates, expert[..., None], axis=-1) > 0
        z = expert_coordinates(logits, one_hot, a, jnp.float32)
        dz = jnp.einsum("bnk,kd->bnd", z, basis.astype(jnp.float32))
        total = total + jnp.where(dispatched, jnp.exp(dz), 0.0)
    return jnp.log(jnp.where(total == 0, _RELEASED_COMBINE_FLOOR, total))


def fuse(z_v: jax.Array, z_d: jax.Array, gram: jax.Array | None, fusion: str, width: int) -> jax.Array:
    """Eq. 6 ('attention'), the released diagonal form ('diagonal'), or addition ('add').

    On coordinates z [B, N, K] in the expert basis U, with gram = U U^T [K, K]: the dot product
    of two adjustments is z_v gram z_d^T, so the N x N attention costs K, not d, per entry.
    gram None: z are the d-wide adjustments themselves.
    """
    if fusion == "add":
        return z_v + z_d
    scale = 1.0 / math.sqrt(width)

    def metric(z):
        return z if gram is None else jnp.einsum("bnk,kl->bnl", z, gram.astype(z.dtype))

    if fusion == "attention":
        # Visual adjustments query the whole depth adjustment map.
        query = metric(z_v)
        logits = jnp.einsum("bnl,bml->bnm", query, z_d).astype(jnp.float32) * scale
        weights = jax.nn.softmax(logits, axis=-1).astype(z_d.dtype)
        return jnp.einsum("bnm,bmk->bnk", weights, z_d)
    # Released: depth queries visual, and only the diagonal weight of each token is kept,
    # F_n = softmax_m(dz_d,n . dz_v,m / sqrt d)[n] * dz_v,n.
    query = metric(z_d)
    logits = jnp.einsum("bnl,bml->bnm", query, z_v).astype(jnp.float32) * scale
    diagonal = jnp.einsum("bnl,bnl->bn", query, z_v).astype(jnp.float32) * scale
    weight = jnp.exp(diagonal - jax.nn.logsumexp(logits, axis=-1))
    return weight[..., None].astype(z_v.dtype) * z_v


def linked_queries(tokens: jax.Array, transform: nnx.Linear, merge: nnx.Linear) -> jax.Array:
    """Rein's `return_auto` with `link_token_to_query`: tokens [L, m, c] -> queries [m, q].

    Linear c -> q per layer, then max, mean and last over the layers, interleaved per channel
    as PyTorch's flatten of [m, q, 3] does, and Linear 3 q -> q.
    """
    tokens = transform(tokens)
    pooled = jnp.stack([tokens.max(axis=0), tokens.mean(axis=0), tokens[-1]], axis=-1)
    return merge(pooled.reshape(pooled.shape[0], -1))


class SpectralMoE(nnx.Module):
    """The adapter of all layers: SpectralMoE, its Table 4 ablations, or REIN (`config.kind`).

    Parameters (L layers, E token sets, G gates):
      experts_a [L, E, m, r], experts_b [L, E, r, d]   expert tokens T_e = A_e B_e
      w_gate, w_noise [L, G, d, E]                     gates, G = 2 (visual, depth) or 1 (shared)
      scale []                                         alpha of Eq. 7, shared by all layers
      mlp_token2feat, mlp_delta_f: Linear d -> d       shared by all layers
      transform: Linear d -> query_dim, merge: Linear 3 query_dim -> query_dim   (queries)
    """

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        layers, sets, m, r, d = c.num_layers, c.token_sets, c.num_tokens, c.rank, c.width
        if c.kind == "rein":
            # LoRAReins: both factors U(+-val), val from the patch size and sqrt(d r).
            bound = math.sqrt(6.0 / (3 * c.patch_size**2 + math.sqrt(d * r)))
            init_a, init_b = _uniform(bound), _uniform(bound)
        else:
            # DepthMoE: kaiming_uniform(a=sqrt 5) on A [m, r] (fan_in r), zeros on B.
            init_a, init_b = _uniform(1.0 / math.sqrt(r)), jax.nn.initializers.zeros
        self.experts_a = nnx.Param(init_a(rngs.params(), (layers, sets, m, r)),
                                   **sharding.axes("layers", "experts", None, None))
        self.experts_b = nnx.Param(init_b(rngs.params(), (layers, sets, r, d)),
                                   **sharding.axes("layers", "experts", None, "embed"))
        if c.routed:
            gate_shape = (layers, c.num_gates, d, c.num_experts)
            gate_axes = sharding.axes("layers", None, "embed", "experts")
            self.w_gate = nnx.Param(jnp.zeros(gate_shape), **gate_axes)
            self.w_noise = nnx.Param(jnp.zeros(gate_shape), **gate_axes)
        self.scale = nnx.Param(jnp.asarray(c.scale_init, jnp.float32))
        self.mlp_token2feat = _torch_linear(d, d, c.dtype, rngs)
        self.mlp_delta_f = _torch_linear(d, d, c.dtype, rngs)
        if c.link_token_to_query:
            self.transform = _torch_linear(d, c.query_dim, jnp.float32, rngs)
            self.merge = _torch_linear(3 * c.query_dim, c.query_dim, jnp.float32, rngs)

    def __call__(
        self,
        layer_index,
        f_v: jax.Array,
        f_d: jax.Array | None = None,
        *,
        train: bool,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Refines the patch tokens f_v [B, N, d] of layer `layer_index` with depth tokens f_d.

        Returns (f_v_out, aux): aux['balance_loss'] is this layer's weighted balance term,
        balance_weight * balance_scale * sum of the cv^2 terms (Eq. 10 plus the load term);
        the caller averages it over the layers, as the released backbone does. aux['expert_v'],
        aux['expert_d'] [B, N] int32 are the top-1 experts (zeros where there is no routing).
        `rng` is needed in training with routing (the gate noise; the layer is folded in).
        """
        c = self.config
        self._check_inputs(f_v, f_d, train, rng)
        dtype = jnp.dtype(c.dtype)
        batch, tokens, _ = f_v.shape
        a = _at_layer(self.experts_a[...], layer_index)
        b = _at_layer(self.experts_b[...], layer_index)
        basis = expert_basis(b, self.mlp_token2feat.kernel[...], self.mlp_token2feat.bias[...])

        eps_v = eps_d = None
        if train and c.routed:
            eps_v, eps_d = routing_noise(rng, layer_index, (batch, tokens, c.num_experts))

        routings = []
        no_expert = jnp.zeros((batch, tokens), jnp.int32)
        # The released combine of k >= 2 experts is per-channel log-sum-exp: d-wide adjustments.
        wide = c.released and c.routed and c.top_k > 1

        # The router, the experts and the fusion are recomputed in the backward: their float32
        # elementwise work over [B, N, E], [B, N, E, m] and [B, N, N] would otherwise be saved
        # per layer, dozens of stacked residuals of the ViT's scan (GiBs), each zero-filled,
        # written and read back (copies in the GPU program, issue 20), for a recomputation of
        # under 1% of the step's FLOPs.
        gating = jax.checkpoint(functools.partial(route, top_k=c.top_k, p=c.gate_p,
                                                  noise_epsilon=c.noise_epsilon))
        fusion = jax.checkpoint(fuse, static_argnums=(3, 4))

        @jax.checkpoint
        def experts(f, gates):
            """Eq. 3-5 for every expert (or the released logits), combined with the gates; with
            k = 1 also the released combine: its gates are exactly 1 and log(exp(dz)) = dz."""
            return expert_coordinates(expert_logits(f, a, b, released=c.released), gates, a,
                                      dtype)

        @jax.checkpoint
        def released_experts(f, routing):
            logits = expert_logits(f, a, b, released=True)
            return released_combine(logits, routing, a, basis).astype(dtype)

        def adjust(f, gate, eps):
            if not c.routed:
                return experts(f, jnp.ones((batch, tokens, 1))), no_expert
            routing = gating(f, _at_layer(self.w_gate[...], layer_index)[gate],
                             _at_layer(self.w_noise[...], layer_index)[gate], eps=eps)
            routings.append(routing)
            if wide:
                return released_experts(f, routing), routing.expert
            return experts(f, routing.gates), routing.expert

        f_in = f_v.astype(dtype)
        z_v, expert_v = adjust(f_in, 0, eps_v)
        expert_d = no_expert
        if c.depth:
            z_d, expert_d = adjust(f_d.astype(dtype), c.num_gates - 1, eps_d)
            fused = fusion(z_v, z_d, None if wide else basis @ basis.T, c.fusion, c.width)
        else:
            fused = z_v
        if wide:
            delta = self.mlp_delta_f(f_in + fused)
        else:
            # Eq. 7, MLP(F + f_v) = MLP(f_v) + z (U W), the fused adjustment never widened to d.
            widen = (basis @ self.mlp_delta_f.kernel[...]).astype(dtype)
            delta = self.mlp_delta_f(f_in) + jnp.einsum("bnk,kd->bnd", fused, widen)
        f_out = f_v + (self.scale[...] * delta).astype(f_v.dtype)

        terms = [cv_squared(getattr(r, term)) for r in routings for term in c.balance_terms]
        balance = c.balance_weight * c.balance_scale * sum(terms, jnp.zeros((), jnp.float32))
        return f_out, {"balance_loss": balance, "expert_v": expert_v, "expert_d": expert_d}

    def query_embedding(self) -> jax.Array | None:
        """Released `link_token_to_query`: decoder query positional embedding [m, query_dim].

        Mean over experts of T_e per layer [L, m, d], Linear d -> query_dim, then max, mean and
        last over the layers, interleaved per channel as PyTorch's flatten of [m, q, 3] does,
        and Linear 3 q -> q.
        """
        if not self.config.link_token_to_query:
            return None
        tokens = jnp.einsum("lemr,lerd->lmd", self.experts_a[...], self.experts_b[...])
        return linked_queries(tokens / self.config.token_sets, self.transform, self.merge)

    def _check_inputs(self, f_v, f_d, train, rng):
        c = self.config
        if f_v.ndim != 3 or f_v.shape[-1] != c.width:
            raise ValueError(f"SpectralMoE: f_v has shape {f_v.shape}, expected [B, N, {c.width}]")
        if c.depth:
            if f_d is None:
                raise ValueError("SpectralMoE: f_d is None but the config uses depth (use_depth)")
            if f_d.shape != f_v.shape:
                raise ValueError(f"SpectralMoE: f_d has shape {f_d.shape}, f_v has {f_v.shape}")
        if train and c.routed and rng is None:
            raise ValueError("SpectralMoE: training with noisy gating needs `rng`")
