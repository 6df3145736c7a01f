"""SET, FADA and DepthForge (and DepthForge's query correction head module) against PyTorch
re-statements of their released code, in float64, reading weights in the released naming.

References: JingjunYi/SET and JingjunYi/FADA `rein/models/backbones/reins.py` (`Reins.forward`
"oursv3", `forward_delta_feat`, `forward_delta_feat2`, `decompose`, `compose`,
`replace_denormals`, `get_wav` / `WavePool`, `LoRAReins`), anonymouse-xzrptkvyqc/DepthForge
`depthforge/models/backbones/depthforge.py` (`DepthForge`, `DepthForgeReins`) and
`heads/depthforge_mask2former.py` (`DynamicQueryCorrectionModule`). They run sequence-first
([N, B, C]) as released; our modules get the same weights through `conversion/methods.py`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from spectralmoe_jax.conversion.methods import (HAAR, convert_method_adapter,
                                                split_query_correction)
from spectralmoe_jax.conversion.rules import ConversionError, load_into_module
from spectralmoe_jax.errors import ConfigError
from spectralmoe_jax.models import adapters
from spectralmoe_jax.models.mask2former.query_correction import QueryCorrection
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import vit_config
from tests.conftest import relative_error

TINY = dict(num_layers=3, rank=4, num_tokens=8, num_queries=8, query_dim=16)
PREFIX = {"set": "backbone.reins.", "fada": "backbone.reins.", "depthforge": "backbone.depthforge."}


def config_of(kind, width=32, **overrides):
    return AdapterConfig(kind=kind, width=width, **(TINY | overrides))


def released_state(config: AdapterConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random LoRAReins / DepthForgeReins state dict of `config.kind` in the released names."""
    rng = np.random.default_rng(seed)
    L, d, m, r, q = (config.num_layers, config.width, config.num_tokens, config.rank,
                     config.query_dim)
    c = d // 4

    def normal(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    kind, p = config.kind, PREFIX[config.kind]
    low = c if kind == "fada" else d  # width of the first token set
    state = {p + "learnable_tokens_a": normal(L, m, r), p + "learnable_tokens_b": normal(L, r, low, std=0.5),
             p + "scale": np.asarray(0.5, np.float32)}
    widths = {"mlp_token2feat": low, "mlp_delta_f": low}
    if kind == "set":
        state[p + "learnable_tokens2"] = normal(L, m, d, std=0.5)
        widths |= {"mlp_token2feat2": d, "mlp_delta_f2": d}
    if kind == "fada":
        state[p + "learnable_tokens_a2"] = normal(L, m, r)
        state[p + "learnable_tokens_b2"] = normal(L, r, 3 * c, std=0.5)
        widths |= {"mlp_token2feat2": 3 * c, "mlp_delta_f2": 3 * c}
        for band, kernel in HAAR.items():  # WavePool(1024)'s fixed kernels, at our width
            state[f"{p}wavepool.{band}.weight"] = np.broadcast_to(
                0.5 * np.asarray(kernel, np.float32), (d, 1, 2, 2)).copy()
    shapes = {name: (w, w) for name, w in widths.items()}
    shapes |= {"transform": (low, q), "merge": (3 * q, q)}
    for name, (n_in, n_out) in shapes.items():
        state[f"{p}{name}.weight"] = normal(n_out, n_in, std=1 / math.sqrt(n_in))
        state[f"{p}{name}.bias"] = normal(n_out, std=0.1)
    return state


def ours(config: AdapterConfig, state) -> nnx.Module:
    vit = vit_config("dinov3_vitl16", width=config.width, depth=config.num_layers, num_heads=2,
                     mlp_dim=2 * config.width)
    module = nnx.eval_shape(lambda: adapters.build_adapter(config, vit, rngs=nnx.Rngs(0)))
    load_into_module(module, convert_method_adapter(state, config))
    return module


# --- the references, float64 PyTorch, sequence-first as released -----------------------------

class Released:
    """The released weights by name, as float64 tensors."""

    def __init__(self, state, kind):
        self.sd = {k[len(PREFIX[kind]):]: torch.tensor(np.asarray(v), dtype=torch.float64)
                   for k, v in state.items()}

    def linear(self, name, x):
        return F.linear(x, self.sd[name + ".weight"], self.sd[name + ".bias"])

    def tokens(self, layer, second=False):
        a, b = ("learnable_tokens_a2", "learnable_tokens_b2") if second else (
            "learnable_tokens_a", "learnable_tokens_b")
        full = self.sd[a] @ self.sd[b]
        return full if layer == -1 else full[layer]

    def delta_feat(self, feats, tokens, embed_dims, second=False, depth=None):
        """`forward_delta_feat` (second: `forward_delta_feat2`, instance-normalised logits);
        `depth`: DepthForge's depth tokens in the logits."""
        suffix = "2" if second else ""
        attn = torch.einsum("nbc,mc->nbm", feats, tokens)
        if second:
            attn = F.instance_norm(attn)
        attn = attn * embed_dims**-0.5
        if depth is not None:
            attn = attn + torch.einsum("nbc,mc->nbm", depth, tokens) * embed_dims**-0.5
        attn = F.softmax(attn, dim=-1)
        delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:],
                             self.linear("mlp_token2feat" + suffix, tokens[1:, :]))
        return self.linear("mlp_delta_f" + suffix, delta + feats)

    def queries(self, num_layers, second_width_tokens=None):
        """`return_auto` with link_token_to_query."""
        tokens = self.linear("transform", self.tokens(-1)).permute(1, 2, 0)
        tokens = torch.cat([F.max_pool1d(tokens, kernel_size=num_layers),
                            F.avg_pool1d(tokens, kernel_size=num_layers),
                            tokens[:, :, -1].unsqueeze(-1)], dim=-1)
        return self.linear("merge", tokens.flatten(-2, -1))


def replace_denormals(x, threshold=1e-5):
    y = x.clone()
    y[(x < threshold) & (x > -1.0 * threshold)] = threshold
    return y


def ref_set(ref: Released, layer, feats):
    """SET's `Reins.forward` (oursv3) on sequence-first feats [N, B, C]."""
    spectrum = torch.fft.fft2(feats, norm="backward")
    # Bins real by symmetry: +0 imaginary part, as ours (see `set_adapter.decompose`).
    n_b, n_c = feats.shape[1:]
    for kb in {0, n_b // 2} if n_b % 2 == 0 else {0}:
        for kc in {0, n_c // 2} if n_c % 2 == 0 else {0}:
            spectrum[:, kb, kc] = spectrum[:, kb, kc].real + 0j
    fft_im = torch.view_as_real(spectrum)
    amp = torch.sqrt(replace_denormals(fft_im.pow(2).sum(dim=-1)))
    pha = torch.atan2(fft_im[..., 1], replace_denormals(fft_im[..., 0]))
    d = feats.shape[-1]
    d_pha = ref.delta_feat(pha, ref.tokens(layer), d)
    d_amp = ref.delta_feat(amp, ref.sd["learnable_tokens2"][layer], d, second=True)
    x = torch.stack([torch.cos(d_pha) * d_amp, torch.sin(d_pha) * d_amp], dim=-1)
    x = x / math.sqrt(x.shape[2] * x.shape[3])
    delta = torch.fft.irfft2(torch.view_as_complex(x), s=x.shape[1:3], norm="ortho")
    return feats + delta * ref.sd["scale"]


def get_wav(in_channels):
    """The released `get_wav` kernels (np.sqrt(2) products), as depthwise conv weights."""
    low = 1 / np.sqrt(2) * np.ones((1, 2))
    high = 1 / np.sqrt(2) * np.ones((1, 2))
    high[0, 0] = -1 * high[0, 0]
    kernels = [low.T * low, low.T * high, high.T * low, high.T * high]
    return [torch.from_numpy(k)[None, None].expand(in_channels, -1, -1, -1) for k in kernels]


def ref_fada(ref: Released, layer, feats):
    """FADA's `Reins.forward` (oursv3) on sequence-first feats [N, B, C]."""
    N, B, C = feats.shape
    h = int(np.sqrt(N))
    x = feats.reshape(B, C, h, h)
    ll, lh, hl, hh = (F.conv2d(x, w, stride=2, groups=C) for w in get_wav(C))
    c = int(C / 4)
    ll, lh, hl, hh = (t.reshape(B, N, c) for t in (ll, lh, hl, hh))
    feats_c = ll.reshape(N, B, c)
    feats_s = torch.cat((lh, hl, hh), -1).reshape(N, B, c * 3)
    d_c = ref.delta_feat(feats_c, ref.tokens(layer), C)
    d_s = ref.delta_feat(feats_s, ref.tokens(layer, second=True), C, second=True)
    return feats + torch.cat((d_c, d_s), -1) * ref.sd["scale"]


def ref_depthforge(ref: Released, layer, feats, depth):
    delta = ref.delta_feat(feats, ref.tokens(layer), feats.shape[-1], depth=depth)
    return feats + delta * ref.sd["scale"]


def sequence_first(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).permute(1, 0, 2)


def batch_first(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 0, 2).numpy()


def features(batch, tokens, width, seed):
    return np.random.default_rng(seed).normal(size=(batch, tokens, width)).astype(np.float32)


def apply_layers(module, f, depth=None, *, train):
    return [np.asarray(module(layer, jnp.asarray(f), None if depth is None else jnp.asarray(depth),
                              train=train)[0]) for layer in range(module.config.num_layers)]


# --- SET ---------------------------------------------------------------------------------------

def test_set_matches_released_within_and_across_sample_groups():
    config = config_of("set", sample_group_train=4)
    state = released_state(config)
    module, ref = ours(config, state), Released(state, "set")
    f = features(4, 6, config.width, seed=1)
    errors = []
    # Training: the 4 samples share one FFT (the released bs x 4 per GPU).
    for layer, out in enumerate(apply_layers(module, f, train=True)):
        errors.append(relative_error(out, batch_first(ref_set(ref, layer, sequence_first(f)))))
    # Evaluation: each image alone (mmseg's test batch 1), a 1-D FFT over its channels.
    for layer, out in enumerate(apply_layers(module, f, train=False)):
        expected = np.concatenate([batch_first(ref_set(ref, layer, sequence_first(f[i:i + 1])))
                                   for i in range(4)])
        errors.append(relative_error(out, expected))
    assert max(errors) <= 1e-5, errors
    # The coupling is real: another second sample changes the first one's training output.
    g = f.copy()
    g[1] += 1.0
    coupled = module(0, jnp.asarray(g), train=True)[0][0] - module(0, jnp.asarray(f), train=True)[0][0]
    alone = module(0, jnp.asarray(g), train=False)[0][0] - module(0, jnp.asarray(f), train=False)[0][0]
    assert float(jnp.abs(coupled).max()) > 1e-3 and float(jnp.abs(alone).max()) == 0.0


def test_set_groups_need_a_batch_they_divide():
    config = config_of("set", sample_group_train=4)
    module = ours(config, released_state(config))
    with pytest.raises(ValueError, match="groups of 4 samples.*batch has 6"):
        module(0, jnp.zeros((6, 5, config.width)), train=True)


# --- FADA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,width", [(64, 64), (16, 32)])
def test_fada_matches_released(tokens, width):
    """N == d (the released 512 px / ViT-L point, here 8 x 8 tokens of 64 channels) and N != d
    (the reshapes mix tokens and samples)."""
    config = config_of("fada", width=width, sample_group_train=2)
    state = released_state(config, seed=2)
    module, ref = ours(config, state), Released(state, "fada")
    f = features(2, tokens, width, seed=3)
    errors = [relative_error(out, batch_first(ref_fada(ref, layer, sequence_first(f))))
              for layer, out in enumerate(apply_layers(module, f, train=True))]
    assert max(errors) <= 1e-5, errors
    evaluated = apply_layers(module, f, train=False)
    per_sample = [np.concatenate([batch_first(ref_fada(ref, layer, sequence_first(f[i:i + 1])))
                                  for i in range(2)]) for layer in range(config.num_layers)]
    assert max(map(relative_error, evaluated, per_sample)) <= 1e-5
    if tokens == width:
        # At N == d the released chain is a Haar split of each token's channels: no mixing.
        np.testing.assert_allclose(evaluated[0], apply_layers(module, f, train=True)[0],
                                   rtol=1e-5, atol=1e-6)


def test_fada_needs_a_square_even_grid_and_keeps_haar_fixed():
    config = config_of("fada", sample_group_train=2)
    state = released_state(config)
    module = ours(config, state)
    with pytest.raises(ConfigError, match="square grid with an even side.*12 tokens"):
        module(0, jnp.zeros((2, 12, config.width)), train=True)
    with pytest.raises(ConfigError, match="square grid with an even side.*9 tokens"):
        module(0, jnp.zeros((2, 9, config.width)), train=True)
    trained = dict(state)
    trained["backbone.reins.wavepool.LH.weight"] = trained["backbone.reins.wavepool.LH.weight"] * 1.1
    with pytest.raises(ConversionError, match="wavepool.LH.weight: not the fixed Haar kernel"):
        convert_method_adapter(trained, config)
    with pytest.raises(ValueError, match="width 30 is not divisible by 4"):
        adapters.check_adapter(config_of("fada", width=30), vit_config("dinov3_vitl16"),
                               depth=False, adapter_layers=None)


# --- DepthForge ----------------------------------------------------------------------------------

def test_depthforge_matches_released():
    config = config_of("depthforge")
    state = released_state(config, seed=4)
    module, ref = ours(config, state), Released(state, "depthforge")
    f, depth = features(2, 10, config.width, seed=5), features(2, 10, config.width, seed=6)
    errors = [relative_error(out, batch_first(ref_depthforge(ref, layer, sequence_first(f),
                                                             sequence_first(depth))))
              for layer, out in enumerate(apply_layers(module, f, depth, train=True))]
    assert max(errors) <= 1e-5, errors
    # The depth tokens matter (they enter the logits only).
    plain = module(1, jnp.asarray(f), jnp.zeros_like(jnp.asarray(depth)), train=False)[0]
    assert relative_error(plain, apply_layers(module, f, depth, train=False)[1]) > 1e-4
    with pytest.raises(ValueError, match="depth tokens"):
        module(0, jnp.asarray(f), None, train=False)


@pytest.mark.parametrize("kind", ["set", "fada", "depthforge"])
def test_queries_match_return_auto(kind):
    config = config_of(kind)
    state = released_state(config, seed=7)
    module, ref = ours(config, state), Released(state, kind)
    expected = ref.queries(config.num_layers).numpy()
    assert relative_error(module.query_embedding(), expected) <= 1e-5


# --- DepthForge's head: the Dynamic Query Correction Module ------------------------------------

class AdaptiveAttentionGate(torch.nn.Module):
    def __init__(self, in_channels, reduction_ratio=16):
        super().__init__()
        self.channel_attention = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, in_channels // reduction_ratio, kernel_size=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(in_channels // reduction_ratio, in_channels, kernel_size=1),
            torch.nn.Sigmoid())
        self.spatial_attention = torch.nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)

    def forward(self, x):
        x = x * self.channel_attention(x)
        return x * torch.sigmoid(self.spatial_attention(x))


class DynamicQueryCorrectionModule(torch.nn.Module):
    def __init__(self, embedding_dim, index=4):
        super().__init__()
        self.attention_gate = AdaptiveAttentionGate(in_channels=embedding_dim)
        self.linear_fuse = torch.nn.Conv2d(embedding_dim * index, embedding_dim, kernel_size=1)

    def forward(self, x_all):
        _, _, h, w = x_all[0].shape
        gated = [self.attention_gate(F.interpolate(x, size=(h, w), mode="bilinear",
                                                   align_corners=False)) for x in x_all]
        return self.linear_fuse(torch.cat(gated, dim=1))


def test_query_correction_matches_the_released_module():
    width = 32
    torch.manual_seed(0)
    reference = DynamicQueryCorrectionModule(width).double().eval()
    state = {f"decode_head.DQCM.{k}": v.float().numpy() for k, v in reference.state_dict().items()}
    state["decode_head.pixel_decoder.mask_feature.weight"] = np.zeros((1,), np.float32)
    rest, params = split_query_correction(state)
    assert list(rest) == ["decode_head.pixel_decoder.mask_feature.weight"]
    module = nnx.eval_shape(lambda: QueryCorrection(width, 4, dtype=jnp.float32,
                                                    rngs=nnx.Rngs(0)))
    load_into_module(module, {k.split("/", 1)[1]: v for k, v in params.items()})
    rng = np.random.default_rng(8)
    maps = [rng.normal(size=(2, int(4 * s), int(6 * s), width)).astype(np.float32) for s in (4, 2, 1, 0.5)]
    with torch.no_grad():
        expected = reference([torch.tensor(m, dtype=torch.float64).permute(0, 3, 1, 2)
                              for m in maps]).permute(0, 2, 3, 1).numpy()
    out = module([jnp.asarray(m) for m in maps])
    assert relative_error(out, expected) <= 1e-5
