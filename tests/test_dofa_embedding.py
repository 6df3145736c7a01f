"""DOFA dynamic patch embedding against a PyTorch re-implementation of `Dynamic_MLP_OFA`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from spectralmoe_jax.conversion.dofa_embedding import dofa_embedding_rules
from spectralmoe_jax.conversion.rules import apply_rules, flatten_state, load_into_module
from spectralmoe_jax.models.dofa_embedding import DynamicPatchEmbed
from tests.conftest import relative_error

WIDTH, PATCH, WV_PLANES = 32, 16, 32


# --- reference, written from DOFA's wave_dynamic_layer.py / pos_embed.py ----------------------

def torch_sincos(dim, pos):
    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = torch.einsum("m,d->md", pos.reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class TorchFCResLayer(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w1 = torch.nn.Linear(dim, dim)
        self.w2 = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class TorchWeightGenerator(torch.nn.Module):
    def __init__(self, dim, out_dim, bias_dim, num_tokens=128):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(
            d_model=dim, nhead=4, activation="gelu", norm_first=False, batch_first=False,
            dropout=0.0,
        )
        self.transformer_encoder = torch.nn.TransformerEncoder(
            layer, num_layers=1, enable_nested_tensor=False
        )
        self.fc_weight = torch.nn.Linear(dim, out_dim)
        self.fc_bias = torch.nn.Linear(dim, bias_dim)
        self.num_tokens = num_tokens
        self.weight_tokens = torch.nn.Parameter(torch.empty(num_tokens, dim))
        self.bias_token = torch.nn.Parameter(torch.empty(1, dim))

    def forward(self, waves):
        x = torch.cat([self.weight_tokens, waves, self.bias_token], dim=0)
        out = self.transformer_encoder(x)
        return self.fc_weight(out[self.num_tokens:-1] + waves), self.fc_bias(out[-1])


class TorchDynamicMLPOFA(torch.nn.Module):
    def __init__(self, wv_planes, kernel_size, embed_dim):
        super().__init__()
        self.wv_planes, self.kernel_size, self.embed_dim = wv_planes, kernel_size, embed_dim
        self.weight_generator = TorchWeightGenerator(
            wv_planes, kernel_size * kernel_size * embed_dim, embed_dim
        )
        self.fclayer = TorchFCResLayer(wv_planes)

    def forward(self, images, wvs):  # images NCHW
        c, k = wvs.shape[0], self.kernel_size
        waves = self.fclayer(torch_sincos(self.wv_planes, wvs * 1000))
        weight, bias = self.weight_generator(waves)
        weight = weight.view(c, k, k, self.embed_dim).permute(3, 0, 1, 2)
        return F.conv2d(images, weight * 0.01, bias=bias * 0.01, stride=k, padding=1)


class TorchViTStub(torch.nn.Module):
    """Holds the embedding as `patch_embed`, so state dict keys read as in DOFA's ViT."""

    def __init__(self):
        super().__init__()
        self.patch_embed = TorchDynamicMLPOFA(WV_PLANES, PATCH, WIDTH)


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    reference = TorchViTStub().eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            # Random everything (LayerNorm gains around 1), so a swapped or untransposed tensor
            # cannot hide behind a default initialisation.
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name and "weight" in name
                    else 0.2 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = apply_rules(state, dofa_embedding_rules("patch_embed."))
    ours = DynamicPatchEmbed(WIDTH, PATCH, WV_PLANES, rngs=nnx.Rngs(0))
    load_into_module(ours, params)
    return reference.patch_embed, ours


def run_both(converted, num_bands, height, width, wavelengths):
    reference, ours = converted
    images = np.random.default_rng(num_bands).normal(size=(2, height, width, num_bands))
    images = images.astype(np.float32)
    wavelengths = np.asarray(wavelengths, dtype=np.float32)
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(wavelengths)
        ).permute(0, 2, 3, 1).numpy()
    # Wavelengths are a traced argument of the jitted call: only their count is static.
    got = nnx.jit(lambda m, x, w: m(x, w))(ours, jnp.asarray(images), jnp.asarray(wavelengths))
    return np.asarray(got), expected


def test_five_bands_non_square(converted):
    got, expected = run_both(converted, 5, 48, 64, [0.49, 0.56, 0.665, 0.83, 1.61])
    assert got.shape == expected.shape == (2, 3, 4, WIDTH)
    assert relative_error(got, expected) <= 1e-5


def test_same_weights_32_hyperspectral_bands(converted):
    # WHU-OHS-like bands, and a size not divisible by the patch (padding 1 decides the grid).
    got, expected = run_both(converted, 32, 50, 40, np.linspace(0.466, 0.940, 32))
    assert got.shape == expected.shape == (2, 3, 2, WIDTH)
    assert relative_error(got, expected) <= 1e-5


def test_rules_mount_under_target_prefix(converted):
    _, ours = converted
    state = {k: v.numpy() for k, v in TorchViTStub().state_dict().items()}
    params = apply_rules(state, dofa_embedding_rules("patch_embed.", "patch_embed/"))
    expected = {"patch_embed/" + k for k in flatten_state(nnx.state(ours, nnx.Param))}
    assert set(params) == expected


def test_band_count_mismatch_names_both_counts(converted):
    _, ours = converted
    with pytest.raises(ValueError, match=r"5 image bands.*4 wavelengths"):
        ours(jnp.zeros((1, 32, 32, 5)), jnp.array([0.49, 0.56, 0.665, 0.83]))


@pytest.mark.parametrize("dim", [WV_PLANES, 128])
def test_wavelength_embedding_rounds_as_torch_under_jit(dim):
    """The frequencies bit for bit, and the embedding of long wavelengths (2.5 um: angles up to
    2500 rad) to within an ulp of sin/cos, jitted as in the model's step."""
    from spectralmoe_jax.models.dofa_embedding import frequencies, wavelength_embedding

    omega = torch.arange(dim // 2, dtype=torch.float32)
    omega /= dim / 2.0
    np.testing.assert_array_equal(frequencies(dim), (1.0 / 10000**omega).numpy())
    wavelengths = np.linspace(0.4, 2.5, 32).astype(np.float32)
    expected = torch_sincos(dim, torch.from_numpy(wavelengths) * 1000).numpy()
    got = jax.jit(lambda w: wavelength_embedding(w * 1000.0, dim))(jnp.asarray(wavelengths))
    assert np.abs(np.asarray(got) - expected).max() <= 2.4e-7
