"""DOFA's wavelength-conditioned dynamic patch embedding (SPEC 1.2).

One set of weights embeds images with any number of bands: the patch kernel and bias are generated
per band from the band's central wavelength (zhu-xlab/DOFA `wave_dynamic_layer.py`,
`Dynamic_MLP_OFA`, as used by SpectralMoE's `DOFAVisionTransformer`):

  e_c = sincos(1000 * lambda_c)                        1-D sin-cos embedding of the wavelength (nm)
  e_c = e_c + relu(W2 relu(W1 e_c + b1) + b2)         FCResLayer
  [t_1..t_128, h_1..h_C, t_b] = Encoder([weight tokens, e_1..e_C, bias token])
  K_c = scaler * fc_weight(h_c + e_c)                  [k, k, D] kernel slice of band c
  b   = scaler * fc_bias(t_b)                          [D]
  tokens = conv(images, K, b, stride k, padding 1)

The hypernetwork is a 1-layer post-norm `torch.nn.TransformerEncoderLayer` (4 heads, exact GELU,
feed-forward 2048, LayerNorm eps 1e-5) over a single unbatched sequence of 128 + C + 1 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

# Initialisers of the original: every nn.Linear gets xavier_uniform weights and bias 0.01.
_xavier = nnx.initializers.xavier_uniform()
_bias_init = nnx.initializers.constant(0.01)


def frequencies(dim: int) -> np.ndarray:
    """omega [dim / 2] of the wavelength embedding, float32, as PyTorch computes it:
    `arange(dim / 2) / (dim / 2)`, then `1 / 10000 ** omega`.

    With positions near 1000 (nm) one ulp of omega moves the angle by ~6e-5, so omega must round
    exactly as PyTorch rounds it. It is a host constant: traced, XLA rewrites `1 / pow(a, b)`
    under jit and rounds 19 of DOFA's 64 frequencies differently (6e-5 in the embedding, 3e-5 in
    the ViT's output). The power is rounded once from float64 (what torch's float32 pow gives
    at DOFA's 128 planes, `tests/test_dofa_embedding.py`), the reciprocal in float32.
    """
    exponent = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    power = np.power(10000.0, exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def wavelength_embedding(wavelengths: jax.Array, dim: int) -> jax.Array:
    """1-D sin-cos embedding [C] -> [C, dim] (DOFA `get_1d_sincos_pos_embed_from_grid_torch`),
    evaluated in float32 in the original's order of operations."""
    if dim % 2:
        raise ValueError(f"wavelength embedding dim must be even, got {dim}")
    angles = wavelengths.astype(jnp.float32)[:, None] * frequencies(dim)[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, kernel_init=_xavier, bias_init=_bias_init, rngs=rngs
    )


class FCResLayer(nnx.Module):
    """Residual MLP on the wavelength embedding: x + relu(w2(relu(w1(x))))."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.w1 = _linear(dim, dim, rngs)
        self.w2 = _linear(dim, dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.relu(self.w2(jax.nn.relu(self.w1(x))))


class SelfAttention(nnx.Module):
    """`torch.nn.MultiheadAttention` self-attention with its packed q/k/v projection.

    `in_proj` holds PyTorch's `in_proj_weight.T` ([dim, 3 * dim], q then k then v, heads
    contiguous within each), so the checkpoint converts with one transpose.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        # MultiheadAttention initialises in_proj with xavier_uniform and zero bias; out_proj is an
        # nn.Linear, so DOFA's weight_init gives it bias 0.01.
        self.in_proj = nnx.Linear(dim, 3 * dim, kernel_init=_xavier, rngs=rngs)
        self.out_proj = _linear(dim, dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [S, dim]
        qkv = rearrange(self.in_proj(x), "s (three h d) -> three h s d", three=3, h=self.num_heads)
        q, k, v = qkv
        scores = jnp.einsum("hqd,hkd->hqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        out = jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(scores, axis=-1), v)
        return self.out_proj(rearrange(out, "h s d -> s (h d)"))


class EncoderLayer(nnx.Module):
    """`torch.nn.TransformerEncoderLayer(norm_first=False, activation="gelu")`, no dropout."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.self_attn = SelfAttention(dim, num_heads, rngs=rngs)
        self.linear1 = _linear(dim, mlp_dim, rngs)
        self.linear2 = _linear(mlp_dim, dim, rngs)
        # Two-pass variance, as PyTorch computes it.
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm1(x + self.self_attn(x))  # post-norm
        return self.norm2(x + self.linear2(jax.nn.gelu(self.linear1(x), approximate=False)))


class TransformerWeightGenerator(nnx.Module):
    """DOFA's hypernetwork: band embeddings [C, d] -> kernel rows [C, out_dim] and a bias [D]."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        bias_dim: int,
        *,
        num_heads: int = 4,
        num_layers: int = 1,
        mlp_dim: int = 2048,
        num_weight_tokens: int = 128,
        rngs: nnx.Rngs,
    ):
        self.layers = nnx.List(
            [EncoderLayer(dim, num_heads, mlp_dim, rngs=rngs) for _ in range(num_layers)]
        )
        self.fc_weight = _linear(dim, out_dim, rngs)
        self.fc_bias = _linear(dim, bias_dim, rngs)
        init = nnx.initializers.normal(stddev=0.02)
        self.weight_tokens = nnx.Param(init(rngs.params(), (num_weight_tokens, dim)))
        self.bias_token = nnx.Param(init(rngs.params(), (1, dim)))

    def __call__(self, waves: jax.Array) -> tuple[jax.Array, jax.Array]:
        num_weight_tokens = self.weight_tokens.shape[0]
        x = jnp.concatenate([self.weight_tokens[...], waves, self.bias_token[...]], axis=0)
        for layer in self.layers:
            x = layer(x)
        # The band tokens get a skip connection from their input embedding; the last token
        # (the bias token) alone makes the bias.
        weights = self.fc_weight(x[num_weight_tokens:-1] + waves)
        bias = self.fc_bias(x[-1])
        return weights, bias


class DynamicPatchEmbed(nnx.Module):
    """Wavelength-conditioned patch embedding of DOFA (`Dynamic_MLP_OFA`).

    Call with `images` [B, H, W, C] and `wavelengths` [C] (central wavelengths in micrometres,
    a traced array is fine: only its length is static). Returns the NHWC token grid
    [B, h, w, width] with h = (H + 2 - k) // k + 1 (stride k = patch_size, padding 1, as the
    original; h = H / k when k divides H). The ViT flattens it to [B, h * w, width] row-major,
    the order of PyTorch's `flatten(2).transpose(1, 2)`.

    The hypernetwork always runs in float32 (the sin-cos embedding of wavelengths in nanometres
    would be meaningless in bfloat16); only the convolution runs in `dtype`.
    """

    def __init__(
        self,
        width: int,
        patch_size: int = 16,
        wv_planes: int = 128,
        *,
        num_heads: int = 4,
        num_layers: int = 1,
        mlp_dim: int = 2048,
        num_weight_tokens: int = 128,
        scaler: float = 0.01,
        padding: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.width = width
        self.patch_size = patch_size
        self.wv_planes = wv_planes
        self.scaler = scaler
        self.padding = padding
        self.dtype = dtype
        self.fclayer = FCResLayer(wv_planes, rngs=rngs)
        self.weight_generator = TransformerWeightGenerator(
            wv_planes,
            patch_size * patch_size * width,
            width,
            num_heads=num_heads,
            num_layers=num_layers,
            mlp_dim=mlp_dim,
            num_weight_tokens=num_weight_tokens,
            rngs=rngs,
        )

    def generate(self, wavelengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Wavelengths [C] (um) -> the HWIO kernel [k, k, C, width] and bias [width], float32."""
        waves = self.fclayer(wavelength_embedding(wavelengths * 1000.0, self.wv_planes))
        weights, bias = self.weight_generator(waves)
        # DOFA's corrected layout: row c is (k, k, width) -> view(C, k, k, D).permute(3, 0, 1, 2)
        # in OIHW, which is (k, k, C, D) in HWIO.
        k = self.patch_size
        kernel = rearrange(weights, "c (i j d) -> i j c d", i=k, j=k, d=self.width)
        return kernel * self.scaler, bias * self.scaler

    def __call__(self, images: jax.Array, wavelengths: jax.Array) -> jax.Array:
        wavelengths = jnp.asarray(wavelengths, dtype=jnp.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
        if wavelengths.ndim != 1 or wavelengths.shape[0] != images.shape[-1]:
            raise ValueError(
                f"DOFA needs one wavelength per band: got {images.shape[-1]} image bands "
                f"(images {images.shape}) and {wavelengths.size} wavelengths "
                f"(wavelengths {wavelengths.shape})"
            )
        kernel, bias = self.generate(wavelengths)
        out = jax.lax.conv_general_dilated(
            images.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.patch_size, self.patch_size),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return out + bias.astype(self.dtype)
