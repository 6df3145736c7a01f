"""The frozen ViT family: DINOv2 (with and without registers), DINOv3, the PromptDA encoder, DOFA.

One pre-norm transformer (SPEC 1.2) with per-family knobs: learned position embeddings
interpolated like DINOv2, 2-D RoPE like DINOv3 (`rope.py`), or DOFA's fixed sin-cos table with
its wavelength-conditioned patch embedding (`dofa_embedding.py`); LayerScale, registers /
storage tokens, SwiGLU, a masked key bias. The blocks are stored stacked (leading layer axis) and
run under `jax.lax.scan`, so compile time does not grow with depth; a hook runs after every block
(docs/design.md, "The ViT contract").

Mixed precision as PyTorch autocast: parameters and the residual stream in float32, matmuls and
attention in `config.dtype`, LayerNorm statistics and the attention softmax in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from spectralmoe_jax.models.resize import bicubic_matrix
from spectralmoe_jax.models import rope as rope_lib
from spectralmoe_jax.models.attention import dot_product_attention
from spectralmoe_jax.models.stacking import stacked

Hook = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    family: str = "dinov2"  # 'dinov2' | 'dinov3' | 'dofa' (wavelength-conditioned patch embedding)
    patch_size: int = 14  # pixels per patch side
    in_channels: int = 3  # input bands
    width: int = 1024  # token width d
    depth: int = 24  # blocks
    num_heads: int = 16  # attention heads
    mlp_dim: int = 4096  # hidden width of the MLP
    ffn: str = "mlp"  # 'mlp' (exact GELU) | 'swiglu'
    num_register_tokens: int = 0  # DINOv2 registers, DINOv3 storage tokens
    position: str = "learned"  # 'learned' | 'rope' | 'sincos'
    pos_grid: tuple[int, int] = (37, 37)  # grid of the learned table
    # How the learned table is resized to another input grid (bicubic, SPEC 5.2). The code the
    # weights come from decides: facebookresearch/dinov2 without registers and PromptDA use the
    # scale factor (h + 0.1) / M ("offset 0.1"); its register models use the output size with
    # antialias; HF `Dinov2Model` the output size without antialias (offset 0.0),
    # `Dinov2WithRegistersModel` with antialias. None (the presets) means "as the weights' origin
    # implies": the loader sets them from the checkpoint's naming scheme
    # (`conversion.vit.implied_settings`); a value set here wins. Left None without weights, the
    # table is resized to the output size without antialias.
    pos_interp_offset: float | None = None
    pos_interp_antialias: bool | None = None  # antialias in that resize; None: as the weights imply
    rope_base: float = 100.0  # RoPE frequency base (DINOv3)
    layerscale: bool = True  # learned per-channel scale on each residual branch
    norm_eps: float = 1e-6  # LayerNorm epsilon
    qkv_bias: bool = True  # bias in the query / key / value projection
    mask_k_bias: bool = False  # DINOv3: the key part of the qkv bias is multiplied by 0
    final_norm: bool = True  # LayerNorm after the last block (`normed` output)
    dofa_wv_planes: int = 128  # DOFA: width of the wavelength embedding
    attention: str | None = "auto"  # 'auto' (cuDNN for bf16 on GPU, else XLA), 'xla', 'cudnn', 'pallas'
    dtype: str = "float32"  # compute dtype
    # Backward-pass memory of the scanned blocks (with the hook): 'none' keeps every residual,
    # 'dots' keeps only matmul outputs and recomputes the elementwise work between them, 'full'
    # keeps only each block's input and recomputes the whole block.
    remat: str = "none"


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_DINOV2 = dict(family="dinov2", patch_size=14, pos_grid=(37, 37))
_DINOV2_REG = dict(_DINOV2, num_register_tokens=4)
_DINOV3 = dict(family="dinov3", patch_size=16, position="rope", num_register_tokens=4,
               norm_eps=1e-5, mask_k_bias=True)
_S = dict(width=384, depth=12, num_heads=6, mlp_dim=1536)
_B = dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
_L = dict(width=1024, depth=24, num_heads=16, mlp_dim=4096)
# SwiGLU's mlp_dim is the originals' aligned hidden size, int(ffn_ratio * width * 2 / 3).
_G = dict(width=1536, depth=40, num_heads=24, mlp_dim=4096, ffn="swiglu")

PRESETS: dict[str, dict] = {
    "dinov2_vits14": dict(_DINOV2, **_S),
    "dinov2_vitb14": dict(_DINOV2, **_B),
    "dinov2_vitl14": dict(_DINOV2, **_L),
    "dinov2_vitg14": dict(_DINOV2, **_G),
    "dinov2_vits14_reg": dict(_DINOV2_REG, **_S),
    "dinov2_vitb14_reg": dict(_DINOV2_REG, **_B),
    "dinov2_vitl14_reg": dict(_DINOV2_REG, **_L),
    "dinov2_vitg14_reg": dict(_DINOV2_REG, **_G),
    "dinov3_vits16": dict(_DINOV3, **_S),
    "dinov3_vits16plus": dict(_DINOV3, **_S, ffn="swiglu"),  # ffn_ratio 6
    "dinov3_vitb16": dict(_DINOV3, **_B),
    "dinov3_vitl16": dict(_DINOV3, **_L),
    "dinov3_vitl16plus": dict(_DINOV3, **_L, ffn="swiglu"),  # ffn_ratio 6
    "dinov3_vith16plus": dict(_DINOV3, width=1280, depth=32, num_heads=20, mlp_dim=5120,
                              ffn="swiglu"),
    "dinov3_vit7b16": dict(_DINOV3, width=4096, depth=40, num_heads=32, mlp_dim=8192,
                           ffn="swiglu", qkv_bias=False),
    # PromptDA's encoder is DINOv2 ViT-L/14 without registers; the released SpectralMoE converts
    # it to patch 16 with a 32 x 32 table (conversion/vit.py) so its tokens align with DINOv3's.
    "promptda_vitl14": dict(_DINOV2, **_L),
    "promptda_vitl16": dict(_DINOV2, **_L) | dict(patch_size=16, pos_grid=(32, 32)),
    # DOFA as the released SpectralMoE runs it (`DOFAVisionTransformer`): the pretrained table
    # (sin-cos values for 14 x 14 patches) resized bicubically to 32 x 32 on conversion
    # (`tools/convert_models/convert_dofa_depthmoe.py`), no final norm (DOFA's files have
    # none). position='sincos' instead recomputes the sin-cos table for the input grid: other
    # values than the resized table (positions 0..31 rather than 0..13 stretched).
    "dofa_vitl16": dict(family="dofa", patch_size=16, pos_grid=(32, 32), layerscale=False,
                        final_norm=False, **_L),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """A named preset (PRESETS), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ViTConfig(**(PRESETS[name] | overrides))


@flax.struct.dataclass
class ViTOutput:
    tokens: jax.Array  # [B, P + N, D] after the last block, no final norm
    normed: jax.Array  # tokens after the final LayerNorm (= tokens when final_norm is off)
    layers: jax.Array  # [L, B, N, D] patch tokens after each block (after the hook)
    hook_aux: Any  # the hook's aux stacked over layers, or None
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)
    num_prefix: int = flax.struct.field(pytree_node=False)


# --- fixed position tables, computed at trace time from static shapes ------------------------

def sincos_2d(grid: tuple[int, int], width: int) -> np.ndarray:
    """MAE/DOFA `get_2d_sincos_pos_embed` for an h x w grid: [h * w, D] float32.

    The first half encodes the column (x) index, the second the row (y) index, as the original
    (its meshgrid puts w first).
    """
    h, w = grid
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(x), one_axis(y)], axis=1).astype(np.float32)


def interpolate_pos_embed(table: jax.Array, source: tuple[int, int], target: tuple[int, int], *,
                          offset: float = 0.0, antialias: bool = False) -> jax.Array:
    """Resizes a [h0 * w0, D] table to the target grid like DINOv2's `interpolate_pos_encoding`
    (torch bicubic, align_corners=False), as two exact interpolation matrices."""
    factors = [(t + offset) / s if offset else None for s, t in zip(source, target)]
    rows = bicubic_matrix(source[0], target[0], scale_factor=factors[0], antialias=antialias)
    cols = bicubic_matrix(source[1], target[1], scale_factor=factors[1], antialias=antialias)
    grid = table.reshape(*source, -1).astype(jnp.float32)
    out = jnp.einsum("ih,jw,hwd->ijd", rows.astype(np.float32), cols.astype(np.float32), grid,
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, table.shape[-1])


# --- blocks ------------------------------------------------------------------------------------

def _linear(config: ViTConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True):
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype,
                      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs):
    # Two-pass variance in float32, as PyTorch.
    return nnx.LayerNorm(config.width, epsilon=config.norm_eps, dtype=config.dtype,
                         use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v], heads contiguous)."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.qkv = _linear(config, config.width, 3 * config.width, rngs, use_bias=config.qkv_bias)
        self.proj = _linear(config, config.width, config.width, rngs)

    def __call__(self, x, rope, num_prefix: int):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        qkv = jnp.dot(x.astype(dtype), self.qkv.kernel[...].astype(dtype))
        if cfg.qkv_bias:
            bias = self.qkv.bias[...]
            if cfg.mask_k_bias:  # dinov3 LinearKMaskedBias: bias * [1, 0, 1] over (q, k, v)
                bias = bias.at[cfg.width:2 * cfg.width].set(0.0)
            qkv = qkv + bias.astype(dtype)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=cfg.num_heads)
        if rope is not None:
            q = rope_lib.apply_rope(q, *rope, num_prefix)
            k = rope_lib.apply_rope(k, *rope, num_prefix)
        out = dot_product_attention(q, k, v, implementation=cfg.attention)
        return self.proj(rearrange(out, "b n h d -> b n (h d)"))


class Mlp(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(config, config.width, config.mlp_dim, rngs)
        self.fc2 = _linear(config, config.mlp_dim, config.width, rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(nnx.Module):
    """w3(silu(w1 x) * w2 x): dinov3 `SwiGLUFFN`, HF gate/up/down, dinov2's fused w12 split."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.w1 = _linear(config, config.width, config.mlp_dim, rngs)
        self.w2 = _linear(config, config.width, config.mlp_dim, rngs)
        self.w3 = _linear(config, config.mlp_dim, config.width, rngs)

    def __call__(self, x):
        return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class LayerScale(nnx.Module):
    def __init__(self, width: int):
        self.gamma = nnx.Param(jnp.full((width,), 1e-5, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...]


class Block(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)); x stays float32."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.norm2 = _layer_norm(config, rngs)
        self.mlp = SwiGLU(config, rngs=rngs) if config.ffn == "swiglu" else Mlp(config, rngs=rngs)
        self.ls1 = LayerScale(config.width) if config.layerscale else None
        self.ls2 = LayerScale(config.width) if config.layerscale else None

    def __call__(self, x, rope, num_prefix: int):
        def residual(branch, scale):
            branch = branch.astype(jnp.float32)
            return branch if scale is None else scale(branch)

        x = x + residual(self.attn(self.norm1(x), rope, num_prefix), self.ls1)
        return x + residual(self.mlp(self.norm2(x)), self.ls2)


# --- the model ---------------------------------------------------------------------------------

def _check(config: ViTConfig) -> None:
    choices = dict(family=("dinov2", "dinov3", "dofa"), ffn=("mlp", "swiglu"),
                   position=("learned", "rope", "sincos"))
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"ViTConfig.{name}={getattr(config, name)!r}; expected one of {allowed}")
    if config.width % config.num_heads:
        raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")


class VisionTransformer(nnx.Module):
    """images [B, H, W, C] -> ViTOutput (docs/design.md, "The ViT contract")."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        _check(config)
        self.config = config
        width = config.width
        init = nnx.initializers.truncated_normal(0.02)
        if config.family == "dofa":
            from spectralmoe_jax.models.dofa_embedding import DynamicPatchEmbed

            self.patch_embed = DynamicPatchEmbed(width, config.patch_size, config.dofa_wv_planes,
                                                 dtype=config.dtype, rngs=rngs)
        else:
            p = config.patch_size
            self.patch_embed = nnx.Conv(config.in_channels, width, (p, p), strides=(p, p),
                                        padding="VALID", dtype=config.dtype, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, width)))
        self.register_tokens = (nnx.Param(init(rngs.params(), (config.num_register_tokens, width)))
                                if config.num_register_tokens else None)
        num_positions = 1 + config.pos_grid[0] * config.pos_grid[1]
        self.pos_embed = (nnx.Param(init(rngs.params(), (num_positions, width)))
                          if config.position == "learned" else None)

        # Every parameter has a leading [depth] axis.
        self.blocks = stacked(lambda rngs: Block(config, rngs=rngs), config.depth, rngs)
        self.norm = _layer_norm(config, rngs) if config.final_norm else None

    @property
    def num_prefix(self) -> int:
        return 1 + self.config.num_register_tokens

    def _learned_positions(self, grid, image_hw):
        """[1 + h*w, D]: the table, interpolated to the grid unless it already fits a square image.

        The skip condition is DINOv2's and HF's (`npatch == N and w == h`, in pixels): a
        non-square image whose grid equals the table's is still resampled, which with offset 0.1
        is not the identity.
        """
        cfg = self.config
        table = self.pos_embed[...]
        if tuple(grid) == tuple(cfg.pos_grid) and image_hw[0] == image_hw[1]:
            return table
        patches = interpolate_pos_embed(table[1:], cfg.pos_grid, grid,
                                        offset=cfg.pos_interp_offset or 0.0,
                                        antialias=bool(cfg.pos_interp_antialias))
        return jnp.concatenate([table[:1], patches], axis=0)

    def embed(self, images, wavelengths=None):
        """Images -> (tokens [B, P + N, D] float32, grid)."""
        cfg = self.config
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
        if cfg.family == "dofa":
            if wavelengths is None:
                raise ValueError("the DOFA ViT needs `wavelengths` (one per band, micrometres)")
            x = self.patch_embed(images, wavelengths)
        else:
            if images.shape[-1] != cfg.in_channels:
                raise ValueError(f"images have {images.shape[-1]} channels, the model expects "
                                 f"{cfg.in_channels} (images {images.shape})")
            x = self.patch_embed(images)
        batch, h, w, _ = x.shape
        x = x.reshape(batch, h * w, cfg.width).astype(jnp.float32)
        cls = self.cls_token[...]
        if cfg.position == "learned":
            pos = self._learned_positions((h, w), images.shape[1:3])
            cls, x = cls + pos[:1], x + pos[1:]
        elif cfg.position == "sincos":  # the cls row of the fixed table is zero
            x = x + sincos_2d((h, w), cfg.width)
        prefix = [cls] if self.register_tokens is None else [cls, self.register_tokens[...]]
        prefix = jnp.broadcast_to(jnp.concatenate(prefix)[None],
                                  (batch, self.num_prefix, cfg.width))
        return jnp.concatenate([prefix, x], axis=1), (h, w)

    def __call__(self, images, hook: Hook | None = None, wavelengths=None) -> ViTOutput:
        cfg = self.config
        tokens, grid = self.embed(images, wavelengths)
        num_prefix = self.num_prefix
        rope = None
        if cfg.position == "rope":
            rope = rope_lib.rope_sincos(grid, cfg.width // cfg.num_heads, cfg.rope_base)
        graphdef, block_state = nnx.split(self.blocks)

        def body(x, scanned):
            layer_state, index = scanned
            x = nnx.merge(graphdef, layer_state)(x, rope, num_prefix)
            patches, aux = x[:, num_prefix:], None
            if hook is not None:
                patches, aux = hook(index, patches)
                x = jnp.concatenate([x[:, :num_prefix], patches.astype(x.dtype)], axis=1)
            return x, (patches, aux)

        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"ViTConfig.remat={cfg.remat!r}: expected one of "
                             f"{sorted(REMAT_POLICIES)}")
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
        tokens, (layers, aux) = jax.lax.scan(
            body, tokens, (block_state, jnp.arange(cfg.depth, dtype=jnp.int32)))
        normed = tokens if self.norm is None else self.norm(tokens)
        return ViTOutput(tokens=tokens, normed=normed, layers=layers, hook_aux=aux, grid=grid,
                         num_prefix=num_prefix)
