"""SET (JingjunYi/SET, `rein/models/backbones/reins.py`, `Reins.forward` "oursv3" with
`LoRAReins`): REIN's token refinement applied to the phase and the amplitude of the features'
Fourier transform, recombined by the inverse transform.

After block l, for the patch tokens as the released code holds them, sequence-first [N, G, d]
(G the samples of one GPU's batch):

  X      = FFT2 over the (sample, channel) axes, per token           `torch.fft.fft2` on [N, B, C]
  amp    = sqrt(rho(Re X^2 + Im X^2)),  phase = atan2(Im X, rho(Re X))
           rho(v) = 1e-5 where |v| < 1e-5 (`replace_denormals`; the sign is lost)
  dphase = Linear_delta(softmax(phase T1^T / sqrt d)[1:] Linear_t2f(T1[1:]) + phase)
           T1 = A_l B_l (low rank)
  damp   = Linear_delta2(softmax(IN(amp T2^T) / sqrt d)[1:] Linear_t2f2(T2[1:]) + amp)
           T2 [m, d] full tokens; IN = instance norm over the m logits of each token and sample
  delta  = irfft2(damp (cos dphase + i sin dphase) / sqrt(2 d), s=(G, d), norm='ortho')
  f_out  = f + scale * delta

What this computes, kept as released (docs/methods.md): the transform runs over each token's
channels and across the samples of the batch, not over the token grid, so in training the
samples of a group are coupled (`sample_group_train`, released 4 per GPU) while a test image
is transformed alone (`sample_group_eval` = 1); `irfft2` reads only the first d // 2 + 1
channel bins of the adjusted spectrum. The queries come from the phase set. 7,546,881
parameters on ViT-L (the paper's Table 3 says 6.13 M).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectralmoe_jax.models.adapters import token_sets
from spectralmoe_jax.models.spectral_moe import AdapterConfig

DENORMAL = 1e-5  # `replace_denormals` threshold


def sample_groups(f: jax.Array, group: int, name: str) -> jax.Array:
    """[B, N, d] -> [B / G, N, G, d]: each group sequence-first, as the released code holds a
    GPU's batch."""
    batch = f.shape[0]
    if batch % group:
        raise ValueError(
            f"{name} transforms across groups of {group} samples, as released "
            f"(model.adapter.sample_group_train / sample_group_eval), but the batch has "
            f"{batch}: use a multiple of {group} or set the group")
    return jnp.swapaxes(f.reshape(batch // group, group, *f.shape[1:]), 1, 2)


def ungroup(x: jax.Array) -> jax.Array:
    """The inverse of `sample_groups`."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(-1, *x.shape[2:])


def replace_denormals(x: jax.Array) -> jax.Array:
    return jnp.where((x < DENORMAL) & (x > -DENORMAL), DENORMAL, x)


def real_bins(rows: int, cols: int) -> np.ndarray:
    """[rows, cols] True where the 2-D spectrum of real input is real (frequency 0 or n / 2 on
    both axes)."""
    def axis(n):
        return np.isin(np.arange(n), [0, n // 2] if n % 2 == 0 else [0])
    return axis(rows)[:, None] & axis(cols)[None, :]


def decompose(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(phase, amplitude) of fft2 over the last two axes (`decompose(x, 'all')`), float32.

    Where the spectrum of real input is real by symmetry, its imaginary part is set to +0: an
    FFT leaves rounding noise of either sign there, and atan2(+-0, Re < 0) = +-pi, so the phase
    (which the tokens then read as a feature) would depend on the FFT library. This is the
    released computation in exact arithmetic.
    """
    spectrum = jnp.fft.fft2(x.astype(jnp.float32))
    real = jnp.real(spectrum)
    imag = jnp.where(real_bins(*x.shape[-2:]), 0.0, jnp.imag(spectrum))
    amplitude = jnp.sqrt(replace_denormals(real**2 + imag**2))
    phase = jnp.arctan2(imag, replace_denormals(real))
    return phase, amplitude


def compose(phase: jax.Array, amplitude: jax.Array) -> jax.Array:
    """Released `compose`: irfft2 of amplitude e^{i phase} / sqrt(2 C) over the last two axes,
    output size (G, C), orthonormal."""
    phase, amplitude = phase.astype(jnp.float32), amplitude.astype(jnp.float32)
    spectrum = jax.lax.complex(jnp.cos(phase) * amplitude, jnp.sin(phase) * amplitude)
    spectrum = spectrum / math.sqrt(2 * phase.shape[-1])
    return jnp.fft.irfft2(spectrum, s=phase.shape[-2:], norm="ortho")


class SET(token_sets.TokenAdapter):
    """Phase set: learnable_tokens_a [L, m, r], learnable_tokens_b [L, r, d], mlp_token2feat,
    mlp_delta_f. Amplitude set: learnable_tokens2 [L, m, d], mlp_token2feat2, mlp_delta_f2.
    Shared: scale, transform, merge (released names)."""

    def __init__(self, config: AdapterConfig, *, rngs: nnx.Rngs):
        c = config
        self._shared(c, c.width, rngs)
        self._rein_set(rngs)  # the phase set
        self.learnable_tokens2 = token_sets.full_tokens(
            c.num_layers, c.num_tokens, c.width, patch_size=c.patch_size, rngs=rngs)
        self.mlp_token2feat2, self.mlp_delta_f2 = self.linears(c.width, rngs)

    def __call__(self, layer_index, f_v, f_d=None, *, train: bool, rng=None):
        c = self.config
        token_sets.check_features("SET", f_v, c.width)
        group = c.sample_group_train if train else c.sample_group_eval
        phase, amplitude = decompose(sample_groups(f_v, group, "SET"))
        dtype, scale = c.dtype, 1.0 / math.sqrt(c.width)
        phase, amplitude = phase.astype(dtype), amplitude.astype(dtype)
        flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])  # noqa: E731 [.., N, G, d] -> [.., N G, d]

        phase_tokens = (token_sets.at_layer(self.learnable_tokens_a, layer_index)
                        @ token_sets.at_layer(self.learnable_tokens_b, layer_index))
        logits = token_sets.token_logits(flat(phase), phase_tokens) * scale
        d_phase = token_sets.refine(flat(phase), logits, phase_tokens, self.mlp_token2feat,
                                    self.mlp_delta_f)
        amplitude_tokens = token_sets.at_layer(self.learnable_tokens2, layer_index)
        logits = token_sets.instance_norm(
            token_sets.token_logits(flat(amplitude), amplitude_tokens)) * scale
        d_amplitude = token_sets.refine(flat(amplitude), logits, amplitude_tokens,
                                        self.mlp_token2feat2, self.mlp_delta_f2)
        delta = compose(d_phase.reshape(phase.shape), d_amplitude.reshape(amplitude.shape))
        return self.refined(f_v, ungroup(delta)), {}

    def query_tokens(self):
        return self.learnable_tokens_a[...] @ self.learnable_tokens_b[...]
