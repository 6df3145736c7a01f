"""The frozen ViT family: DINOv2 (with and without registers), DINOv3 (up to 7B), the PromptDA and
Depth-Anything-V2 encoders, DOFA, CLIP, SAM's image encoder and EVA02.

One pre-norm transformer (SPEC 1.2) with orthogonal switches rather than a file per family:
- position: a learned table interpolated to the input grid (bicubic like DINOv2 / HF / timm, or
  bilinear like the released CLIP wrapper), DOFA's fixed sin-cos table, and/or 2-D RoPE in the
  DINOv3 or the EVA02 form (`rope.py`);
- tokens: a class token or none (SAM), registers / storage tokens, CLIP's LayerNorm on the
  embedded tokens (`ln_pre`), a patch projection without bias (CLIP);
- blocks: LayerScale, exact GELU, QuickGELU (CLIP) or SwiGLU (with EVA02's sub-LN), a masked key
  bias (DINOv3, EVA02), SAM's windowed attention with periodic global blocks and decomposed
  relative position biases; DOFA's wavelength-conditioned patch embedding (`dofa_embedding.py`).
The blocks are stored stacked (leading layer axis) and run under `jax.lax.scan`, so compile time
does not grow with depth; SAM's windowed and global blocks are two stacks run as a scan over
groups (windowed blocks, then one global block). A hook runs after every block, and `BlockTaps`
reach inside the blocks (docs/design.md, "The ViT contract").

Mixed precision as PyTorch autocast: parameters and the residual stream in float32, matmuls and
attention in `config.dtype`, LayerNorm statistics and the attention softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from spectralmoe_jax import sharding
from spectralmoe_jax.models.resize import interpolation_matrix, linear_matrix
from spectralmoe_jax.models import rope as rope_lib
from spectralmoe_jax.models.attention import dot_product_attention
from spectralmoe_jax.models.stacking import stacked

Hook = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
# Where `BlockTaps` reach into a block: the output of one of its linear layers (the delta's
# input is that layer's input), or 'mlp', a branch beside the MLP whose input is the residual
# stream before norm2 and whose output is added to the block's output (AdaptFormer's parallel
# adapter).
SITES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w1", "mlp.w2", "mlp.w3", "mlp")


@dataclasses.dataclass(frozen=True)
class BlockTaps:
    """An adapter inside the frozen blocks: LoRA, AdaptFormer, VPT (docs/design.md).

    `params` is a pytree whose leaves all have a leading [depth] axis: the scan over blocks
    slices it with the block parameters, so block l sees `p`, its slice l, and the gradient
    accumulates into the stacked arrays. `delta(site, p, x)` is added to the output of every
    site in `sites` (x: the site's input). `prompts(p)` gives `num_prompts` tokens [P, D]
    inserted after the prefix tokens before the block and dropped after it (VPT-deep): they
    attend and are attended, take no position embedding or RoPE, and never reach the hook or
    the outputs. Parts left out are not traced.
    """

    params: Any
    sites: frozenset[str] = frozenset()
    delta: Callable[[str, Any, jax.Array], jax.Array] | None = None
    num_prompts: int = 0
    prompts: Callable[[Any], jax.Array] | None = None

    def __post_init__(self):
        unknown = set(self.sites) - set(SITES)
        if unknown:
            raise ValueError(f"BlockTaps: unknown sites {sorted(unknown)}; known: {SITES}")
        if self.sites and self.delta is None:
            raise ValueError(f"BlockTaps: sites {sorted(self.sites)} need a delta function")
        if self.num_prompts and self.prompts is None:
            raise ValueError("BlockTaps: num_prompts > 0 needs a prompts function")


Tap = Callable[[str, jax.Array, jax.Array], jax.Array]  # (site, x, y) -> y with the site's delta


def _tapped(tap: Tap | None, site: str, x, y):
    """y, or y plus the adapter's delta at `site` (x the site's input)."""
    return y if tap is None else tap(site, x, y)


FAMILIES = ("dinov2", "dinov3", "dofa", "clip", "sam", "eva02")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    # The checkpoint layout the converter expects; 'dofa' also selects the wavelength-conditioned
    # patch embedding. Everything else is decided by the switches below.
    family: str = "dinov2"  # 'dinov2' | 'dinov3' | 'dofa' | 'clip' | 'sam' | 'eva02'
    patch_size: int = 14  # pixels per patch side
    in_channels: int = 3  # input bands
    width: int = 1024  # token width d
    depth: int = 24  # blocks
    num_heads: int = 16  # attention heads
    mlp_dim: int = 4096  # hidden width of the MLP
    ffn: str = "mlp"  # 'mlp' | 'swiglu'
    act: str = "gelu"  # activation of 'mlp': 'gelu' (exact) | 'quick_gelu' (CLIP, x sigmoid(1.702 x))
    ffn_norm: bool = False  # LayerNorm on the SwiGLU hidden before w3 (EVA02's sub-LN `ffn_ln`)
    cls_token: bool = True  # False: no class token (SAM)
    num_register_tokens: int = 0  # DINOv2 registers, DINOv3 storage tokens
    position: str = "learned"  # 'learned' | 'rope' (DINOv3: RoPE, no table) | 'sincos' | 'none'
    pos_grid: tuple[int, int] = (37, 37)  # grid of the learned table
    # How the learned table is resized to another input grid, skipped when the grid is the
    # table's and the image square: 'bicubic' (DINOv2, HF, timm) or 'bilinear' (the released CLIP
    # wrapper). The code the weights come from decides the rest (SPEC 5.2): facebookresearch/
    # dinov2 without registers and PromptDA use the scale factor (h + 0.1) / M ("offset 0.1");
    # its register models use the output size with antialias; HF `Dinov2Model` the output size
    # without antialias (offset 0.0), `Dinov2WithRegistersModel` with antialias; timm (EVA02,
    # SAM) antialias. None (the DINOv2 presets) means "as the weights' origin implies": the
    # loader sets them from the checkpoint's naming scheme (`conversion.vit.implied_settings`);
    # a value set here wins. Left None without weights, the table is resized to the output size
    # without antialias.
    pos_interp: str = "bicubic"
    pos_interp_offset: float | None = None  # scale factor (h + offset) / M; None: as implied
    pos_interp_antialias: bool | None = None  # antialias in that resize; None: as the weights imply
    # The released SpectralMoE / Rein `clip.py` adds the class embedding to the token and again
    # to the cls position row: cls = 2 class_embedding + pos[0] (OpenAI CLIP adds it once).
    cls_embed_twice: bool = False
    rope: str | None = None  # RoPE on top of `position`: None | 'dinov3' | 'eva' (EVA02)
    rope_base: float = 100.0  # DINOv3's base; EVA02's theta (10000)
    rope_ref_grid: tuple[int, int] | None = None  # EVA02: coordinates scaled to this grid
    patch_bias: bool = True  # False: CLIP's bias-free patch projection (conv1)
    embed_norm: bool = False  # LayerNorm on the embedded tokens before the blocks (CLIP ln_pre)
    layerscale: bool = True  # learned per-channel scale on each residual branch
    norm_eps: float = 1e-6  # LayerNorm epsilon
    qkv_bias: bool = True  # bias in the query / key / value projection
    mask_k_bias: bool = False  # DINOv3, EVA02: the key part of the qkv bias is (kept) zero
    final_norm: bool = True  # LayerNorm after the last block (`normed` output)
    # SAM: attention within window_size x window_size windows of the patch grid (zero-padded to
    # a multiple) except in `global_blocks`, which must be the last block of equal groups
    # (SAM-H: 7, 15, 23, 31); decomposed relative position biases (rel_pos_h / rel_pos_w) in
    # every block, sized 2 window - 1 or 2 pos_grid - 1 and linearly resized to other grids.
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()  # SAM: the blocks with global attention
    rel_pos: bool = False  # SAM: decomposed relative position biases in every block
    dofa_wv_planes: int = 128  # DOFA: width of the wavelength embedding
    attention: str | None = "auto"  # 'auto' (cuDNN for bf16 on GPU, else XLA), 'xla', 'cudnn', 'pallas'
    dtype: str = "float32"  # compute dtype
    # Backward-pass memory of the scanned blocks (with the hook): 'none' keeps every residual,
    # 'dots' keeps only matmul outputs and recomputes the elementwise work between them, 'full'
    # keeps only each block's input and recomputes the whole block.
    remat: str = "none"

    def __post_init__(self):
        # Command lines and ml_collections hand over lists; the config must stay hashable.
        for name in ("pos_grid", "rope_ref_grid", "global_blocks"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))

    @property
    def rope_kind(self) -> str | None:
        """'dinov3', 'eva' or None: position='rope' is DINOv3's RoPE without a table."""
        return "dinov3" if self.position == "rope" else self.rope

    @property
    def num_prefix(self) -> int:
        """Class token + registers / storage tokens, ahead of the patch tokens."""
        return int(self.cls_token) + self.num_register_tokens


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
# OpenAI CLIP's vision tower as the released wrapper (`clip.py`) runs it: QuickGELU, ln_pre, no
# patch bias, LayerNorm eps 1e-5, bilinear position interpolation, the class embedding twice.
# For OpenAI / open_clip / HF exactly: cls_embed_twice=False, pos_interp='bicubic' (HF).
_CLIP = dict(family="clip", patch_size=14, pos_grid=(16, 16), act="quick_gelu", patch_bias=False,
             embed_norm=True, layerscale=False, norm_eps=1e-5, pos_interp="bilinear",
             cls_embed_twice=True)
# segment-anything `ImageEncoderViT` without its neck (the released wrapper feeds block outputs):
# no class token, a 64 x 64 table (1024 px), 14 x 14 windows, global blocks closing four groups.
_SAM = dict(family="sam", patch_size=16, pos_grid=(64, 64), cls_token=False, layerscale=False,
            final_norm=False, window_size=14, rel_pos=True, pos_interp_antialias=True)
# EVA02 as timm `eva02_*_patch14_*` and the released `eva_02.py`: RoPE referenced to the 16 x 16
# pretraining grid, SwiGLU with sub-LN (hidden int(4 * 2/3 * width)), q and v biases, no
# LayerScale; features are block outputs (timm's norm is an Identity, fc_norm belongs to the head).
_EVA02 = dict(family="eva02", patch_size=14, pos_grid=(16, 16), rope="eva", rope_base=10000.0,
              rope_ref_grid=(16, 16), ffn="swiglu", ffn_norm=True, mask_k_bias=True,
              layerscale=False, final_norm=False, pos_interp_antialias=True)

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
    # Depth-Anything-V2's encoder (`depth_anything_v2/dinov2.py`): DINOv2 without registers,
    # offset 0.1; the patch-16 form aligns its tokens with DINOv3's as promptda_vitl16 does.
    "depth_anything_v2_vits14": dict(_DINOV2, **_S),
    "depth_anything_v2_vitb14": dict(_DINOV2, **_B),
    "depth_anything_v2_vitl14": dict(_DINOV2, **_L),
    "depth_anything_v2_vitg14": dict(_DINOV2, **_G),
    "depth_anything_v2_vitl16": dict(_DINOV2, **_L) | dict(patch_size=16, pos_grid=(32, 32)),
    "clip_vitb16": dict(_CLIP, **_B) | dict(patch_size=16, pos_grid=(14, 14)),
    "clip_vitl14": dict(_CLIP, **_L),
    # The released 512 px form: kernel 14 -> 16 (bicubic) and table 16 -> 32 (bilinear) at load.
    "clip_vitl16": dict(_CLIP, **_L) | dict(patch_size=16, pos_grid=(32, 32)),
    "sam_vitb16": dict(_SAM, **_B, global_blocks=(2, 5, 8, 11)),
    "sam_vitl16": dict(_SAM, **_L, global_blocks=(5, 11, 17, 23)),
    "sam_vith16": dict(_SAM, width=1280, depth=32, num_heads=16, mlp_dim=5120,
                       global_blocks=(7, 15, 23, 31)),
    "eva02_vitb14": dict(_EVA02, width=768, depth=12, num_heads=12, mlp_dim=2048),
    "eva02_vitl14": dict(_EVA02, width=1024, depth=24, num_heads=16, mlp_dim=2730),
    # The released 512 px form (Rein's `convert_eva2_512x512.py`): kernel 14 -> 16 and table
    # 16 -> 32 bicubic at load; RoPE stays referenced to the 16 x 16 grid (pt_hw_seq_len=16).
    "eva02_vitl16": dict(_EVA02, width=1024, depth=24, num_heads=16, mlp_dim=2730,
                         patch_size=16, pos_grid=(32, 32)),
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
                          offset: float = 0.0, antialias: bool = False,
                          mode: str = "bicubic") -> jax.Array:
    """Resizes a [h0 * w0, D] table to the target grid like DINOv2's `interpolate_pos_encoding`
    (torch bicubic or bilinear, align_corners=False), as two exact interpolation matrices."""
    factors = [(t + offset) / s if offset else None for s, t in zip(source, target)]
    rows = interpolation_matrix(source[0], target[0], mode, scale_factor=factors[0],
                                antialias=antialias)
    cols = interpolation_matrix(source[1], target[1], mode, scale_factor=factors[1],
                                antialias=antialias)
    grid = table.reshape(*source, -1).astype(jnp.float32)
    out = jnp.einsum("ih,jw,hwd->ijd", rows.astype(np.float32), cols.astype(np.float32), grid,
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, table.shape[-1])


# --- blocks ------------------------------------------------------------------------------------

def _linear(config: ViTConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True,
            names: tuple[str, str] = (None, None)):
    """`names`: the logical axes of the kernel [in, out] (`sharding.py`)."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype,
                      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs,
                      kernel_metadata=sharding.axes(*names), bias_metadata=sharding.axes(names[1]))


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs, features: int | None = None):
    # Two-pass variance in float32, as PyTorch.
    return nnx.LayerNorm(features or config.width, epsilon=config.norm_eps, dtype=config.dtype,
                         use_fast_variance=False, rngs=rngs)


def relative_positions(table: jax.Array, size: int) -> jax.Array:
    """[size, size, Dh]: row i - j + size - 1 of a [L, Dh] relative table, the table first
    linearly resized to 2 size - 1 rows when it has another length (segment-anything
    `get_rel_pos`, torch 'linear', align_corners=False)."""
    rows = 2 * size - 1
    table = table.astype(jnp.float32)
    if table.shape[0] != rows:
        matrix = linear_matrix(table.shape[0], rows).astype(np.float32)
        table = jnp.dot(matrix, table, precision=jax.lax.Precision.HIGHEST)
    index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
    return table[index]


def decomposed_rel_pos_bias(q, rel_h, rel_w, grid: tuple[int, int]):
    """SAM's (MViTv2's) decomposed relative position bias [B, H, T, T] for queries q [B, T, H, Dh]
    on a row-major grid: bias[(i, j), (k, l)] = q_ij . R_h[i, k] + q_ij . R_w[j, l], with the
    unscaled q, as `add_decomposed_rel_pos`."""
    gh, gw = grid
    q = rearrange(q.astype(jnp.float32), "b (i j) n c -> b n i j c", i=gh, j=gw)
    bias_h = jnp.einsum("bnijc,ikc->bnijk", q, relative_positions(rel_h, gh))
    bias_w = jnp.einsum("bnijc,jlc->bnijl", q, relative_positions(rel_w, gw))
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return rearrange(bias, "b n i j k l -> b n (i j) (k l)")


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v], heads contiguous),
    optional RoPE and SAM's decomposed relative position bias over a `rel_grid` sized table."""

    def __init__(self, config: ViTConfig, *, rel_grid: tuple[int, int] | None = None,
                 rngs: nnx.Rngs):
        self.config = config
        self.qkv = _linear(config, config.width, 3 * config.width, rngs, use_bias=config.qkv_bias,
                           names=("embed", "qkv"))
        self.proj = _linear(config, config.width, config.width, rngs, names=("heads", "embed"))
        head_dim = config.width // config.num_heads
        rel_pos = [None, None]
        if config.rel_pos:  # zero-initialised, as segment-anything
            rel_pos = [nnx.Param(jnp.zeros((2 * n - 1, head_dim), jnp.float32)) for n in rel_grid]
        self.rel_pos_h, self.rel_pos_w = rel_pos

    def __call__(self, x, rope, num_prefix: int, grid: tuple[int, int], tap: Tap | None = None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        qkv = _tapped(tap, "attn.qkv", x, jnp.dot(x.astype(dtype), self.qkv.kernel[...].astype(dtype)))
        if cfg.qkv_bias:
            bias = self.qkv.bias[...]
            if cfg.mask_k_bias:  # dinov3 LinearKMaskedBias: bias * [1, 0, 1] over (q, k, v)
                # (a product, as dinov3's, rather than a scatter: this exports to ONNX)
                bias = bias * np.repeat(np.array([1, 0, 1], bias.dtype), cfg.width)
            qkv = qkv + bias.astype(dtype)
        # Slices of the [B, N, 3, H, Dh] view, not a leading q/k/v axis: moving that axis to the
        # front is a transpose of every block's qkv (and of its gradient) in the GPU program.
        qkv = qkv.reshape(*qkv.shape[:-1], 3, cfg.num_heads, cfg.width // cfg.num_heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if rope is not None:
            interleaved = cfg.rope_kind == "eva"
            q = rope_lib.apply_rope(q, *rope, num_prefix, interleaved=interleaved)
            k = rope_lib.apply_rope(k, *rope, num_prefix, interleaved=interleaved)
        bias = None
        if self.rel_pos_h is not None:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h[...], self.rel_pos_w[...], grid)
            bias = bias.astype(dtype)
        out = dot_product_attention(q, k, v, bias=bias, implementation=cfg.attention)
        out = rearrange(out, "b n h d -> b n (h d)")
        return _tapped(tap, "attn.proj", out, self.proj(out))


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.act = config.act
        self.fc1 = _linear(config, config.width, config.mlp_dim, rngs, names=("embed", "mlp"))
        self.fc2 = _linear(config, config.mlp_dim, config.width, rngs, names=("mlp", "embed"))

    def __call__(self, x, tap: Tap | None = None):
        h = _tapped(tap, "mlp.fc1", x, self.fc1(x))
        h = _quick_gelu(h) if self.act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return _tapped(tap, "mlp.fc2", h, self.fc2(h))


class SwiGLU(nnx.Module):
    """w3(norm(silu(w1 x) * w2 x)): dinov3 `SwiGLUFFN`, HF gate/up/down, dinov2's fused w12 split;
    the norm is EVA02's sub-LN (`ffn_ln`, timm `mlp.norm`) when `ffn_norm`, else absent."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.w1 = _linear(config, config.width, config.mlp_dim, rngs, names=("embed", "mlp"))
        self.w2 = _linear(config, config.width, config.mlp_dim, rngs, names=("embed", "mlp"))
        self.ffn_norm = _layer_norm(config, rngs, config.mlp_dim) if config.ffn_norm else None
        self.w3 = _linear(config, config.mlp_dim, config.width, rngs, names=("mlp", "embed"))

    def __call__(self, x, tap: Tap | None = None):
        hidden = (jax.nn.silu(_tapped(tap, "mlp.w1", x, self.w1(x)))
                  * _tapped(tap, "mlp.w2", x, self.w2(x)))
        if self.ffn_norm is not None:
            hidden = self.ffn_norm(hidden)
        return _tapped(tap, "mlp.w3", hidden, self.w3(hidden))


class LayerScale(nnx.Module):
    def __init__(self, width: int):
        self.gamma = nnx.Param(jnp.full((width,), 1e-5, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...]


def windowed(attention, x, grid: tuple[int, int], size: int):
    """Attention within size x size windows of the row-major patch grid (segment-anything
    `window_partition`): the normed tokens are zero-padded to a multiple of the window (the
    padding takes part in attention, unmasked, as in the original) and cropped back."""
    batch, _, width = x.shape
    gh, gw = grid
    ph, pw = -gh % size, -gw % size
    x = jnp.pad(x.reshape(batch, gh, gw, width), ((0, 0), (0, ph), (0, pw), (0, 0)))
    rows, cols = (gh + ph) // size, (gw + pw) // size
    x = rearrange(x, "b (i s) (j t) d -> (b i j) (s t) d", s=size, t=size)
    x = attention(x, None, 0, (size, size))
    x = rearrange(x, "(b i j) (s t) d -> b (i s) (j t) d", b=batch, i=rows, j=cols, s=size)
    return x[:, :gh, :gw].reshape(batch, gh * gw, width)


class Block(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)); x stays float32.
    `window` > 0: attention within windows (SAM), its relative table sized to the window."""

    def __init__(self, config: ViTConfig, *, window: int = 0, rngs: nnx.Rngs):
        self.window = window
        rel_grid = (window, window) if window else config.pos_grid
        self.norm1 = _layer_norm(config, rngs)
        self.attn = Attention(config, rel_grid=rel_grid, rngs=rngs)
        self.norm2 = _layer_norm(config, rngs)
        self.mlp = SwiGLU(config, rngs=rngs) if config.ffn == "swiglu" else Mlp(config, rngs=rngs)
        self.ls1 = LayerScale(config.width) if config.layerscale else None
        self.ls2 = LayerScale(config.width) if config.layerscale else None

    def __call__(self, x, rope, num_prefix: int, grid: tuple[int, int], tap: Tap | None = None):
        def residual(branch, scale):
            branch = branch.astype(jnp.float32)
            return branch if scale is None else scale(branch)

        h = self.norm1(x)
        if self.window:
            attn = self.attn if tap is None else functools.partial(self.attn, tap=tap)
            h = windowed(attn, h, grid, self.window)
        else:
            h = self.attn(h, rope, num_prefix, grid, tap=tap)
        x = x + residual(h, self.ls1)
        # A parallel branch ('mlp') reads the stream before norm2 and is added outside the
        # LayerScale (AdaptFormer's `Block.forward`, ffn_option='parallel').
        return _tapped(tap, "mlp", x, x + residual(self.mlp(self.norm2(x), tap=tap), self.ls2))


# --- the model ---------------------------------------------------------------------------------

def _check(config: ViTConfig) -> None:
    choices = dict(family=FAMILIES, ffn=("mlp", "swiglu"), act=("gelu", "quick_gelu"),
                   position=("learned", "rope", "sincos", "none"),
                   pos_interp=("bicubic", "bilinear"), rope=(None, "dinov3", "eva"))
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"ViTConfig.{name}={getattr(config, name)!r}; expected one of {allowed}")
    if config.width % config.num_heads:
        raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")
    if config.position == "rope" and config.rope not in (None, "dinov3"):
        raise ValueError(f"position='rope' is DINOv3's RoPE; got rope={config.rope!r}")
    if config.cls_embed_twice and not (config.cls_token and config.position == "learned"):
        raise ValueError("cls_embed_twice needs a class token and a learned position table")
    if config.ffn_norm and config.ffn != "swiglu":
        raise ValueError("ffn_norm is the SwiGLU sub-LN: it needs ffn='swiglu'")
    if config.global_blocks and not config.window_size:
        raise ValueError(f"global_blocks {config.global_blocks} need window_size > 0")
    if config.window_size:
        if config.num_prefix:
            raise ValueError("windowed attention needs a grid of patch tokens only: set "
                             "cls_token=False and num_register_tokens=0")
        groups = len(config.global_blocks)
        period = config.depth // groups if groups else config.depth
        expected = tuple(period * (g + 1) - 1 for g in range(groups))
        if groups and (config.depth % groups or period < 2 or config.global_blocks != expected):
            raise ValueError(
                f"global_blocks {config.global_blocks} must close equal groups of the "
                f"{config.depth} blocks (SAM-H: (7, 15, 23, 31) of 32); {groups} groups of "
                f"{config.depth} blocks would be {expected}")


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
                                        padding="VALID", use_bias=config.patch_bias,
                                        dtype=config.dtype, rngs=rngs,
                                        kernel_metadata=sharding.axes(None, None, None, "embed"),
                                        bias_metadata=sharding.axes("embed"))
        self.cls_token = (nnx.Param(init(rngs.params(), (1, width)))
                          if config.cls_token else None)
        self.register_tokens = (nnx.Param(init(rngs.params(), (config.num_register_tokens, width)))
                                if config.num_register_tokens else None)
        num_positions = int(config.cls_token) + config.pos_grid[0] * config.pos_grid[1]
        self.pos_embed = (nnx.Param(init(rngs.params(), (num_positions, width)))
                          if config.position == "learned" else None)
        self.embed_norm = _layer_norm(config, rngs) if config.embed_norm else None

        # Every parameter has a leading [depth] axis; with windowed attention, `blocks` holds
        # the windowed blocks and `global_blocks` the others, each stack in layer order.
        window = config.window_size
        num_global = len(config.global_blocks)
        self.blocks = stacked(lambda rngs: Block(config, window=window, rngs=rngs),
                              config.depth - num_global, rngs)
        self.global_blocks = (stacked(lambda rngs: Block(config, rngs=rngs), num_global, rngs)
                              if num_global else None)
        self.norm = _layer_norm(config, rngs) if config.final_norm else None

    @property
    def num_prefix(self) -> int:
        return self.config.num_prefix

    def _learned_positions(self, grid, image_hw):
        """[C + h*w, D] (C = 1 with a class token): the table, interpolated to the grid unless it
        already fits a square image.

        The skip condition is DINOv2's and HF's (`npatch == N and w == h`, in pixels): a
        non-square image whose grid equals the table's is still resampled, which with offset 0.1
        is not the identity.
        """
        cfg = self.config
        table = self.pos_embed[...]
        if tuple(grid) == tuple(cfg.pos_grid) and image_hw[0] == image_hw[1]:
            return table
        rows = int(cfg.cls_token)
        patches = interpolate_pos_embed(table[rows:], cfg.pos_grid, grid,
                                        offset=cfg.pos_interp_offset or 0.0,
                                        antialias=bool(cfg.pos_interp_antialias),
                                        mode=cfg.pos_interp)
        return jnp.concatenate([table[:rows], patches], axis=0)

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
        prefix = []
        if cfg.cls_token:
            prefix.append(self.cls_token[...])
        if cfg.position == "learned":
            pos = self._learned_positions((h, w), images.shape[1:3])
            x = x + pos[len(prefix):]
            if cfg.cls_token:
                prefix[0] = prefix[0] + pos[:1]
                if cfg.cls_embed_twice:
                    prefix[0] = prefix[0] + self.cls_token[...]
        elif cfg.position == "sincos":  # the cls row of the fixed table is zero
            x = x + sincos_2d((h, w), cfg.width)
        if self.register_tokens is not None:
            prefix.append(self.register_tokens[...])
        if prefix:
            prefix = jnp.broadcast_to(jnp.concatenate(prefix)[None],
                                      (batch, self.num_prefix, cfg.width))
            x = jnp.concatenate([prefix, x], axis=1)
        if self.embed_norm is not None:
            x = self.embed_norm(x).astype(jnp.float32)
        return x, (h, w)

    def _rope(self, grid):
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        if cfg.rope_kind == "dinov3":
            return rope_lib.rope_sincos(grid, head_dim, cfg.rope_base)
        if cfg.rope_kind == "eva":
            return rope_lib.eva_rope_sincos(grid, head_dim, cfg.rope_base, cfg.rope_ref_grid)
        return None

    def __call__(self, images, hook: Hook | None = None, wavelengths=None,
                 taps: BlockTaps | None = None) -> ViTOutput:
        cfg = self.config
        tokens, grid = self.embed(images, wavelengths)
        num_prefix = self.num_prefix
        rope = self._rope(grid)
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"ViTConfig.remat={cfg.remat!r}: expected one of "
                             f"{sorted(REMAT_POLICIES)}")
        num_prompts = taps.num_prompts if taps is not None else 0
        if num_prompts and cfg.window_size:
            raise ValueError("prompt tokens (VPT) have no place in windowed attention: the "
                             "windows partition the patch grid (SAM)")

        def step(graphdef):
            """The scan body of one block stack: (x, (layer params, taps' slice, index)) ->
            (x, outputs)."""

            def body(x, scanned):
                layer_state, p, index = scanned
                # Pins the residual stream's layout on a mesh (batch split; FSDP gathers weights).
                x = sharding.constrain(x, "batch", "tokens", None)
                tap = None
                if taps is not None and taps.sites:
                    def tap(site, inputs, y):
                        if site not in taps.sites:
                            return y
                        return y + taps.delta(site, p, inputs).astype(y.dtype)
                if num_prompts:  # VPT-deep: this block's prompts after the prefix
                    prompts = jnp.broadcast_to(taps.prompts(p).astype(x.dtype),
                                               (x.shape[0], num_prompts, x.shape[-1]))
                    x = jnp.concatenate([x[:, :num_prefix], prompts, x[:, num_prefix:]], axis=1)
                x = nnx.merge(graphdef, layer_state)(x, rope, num_prefix + num_prompts, grid,
                                                     tap=tap)
                if num_prompts:  # their outputs are dropped
                    x = jnp.concatenate([x[:, :num_prefix], x[:, num_prefix + num_prompts:]],
                                        axis=1)
                patches, aux = x[:, num_prefix:], None
                if hook is not None:
                    patches, aux = hook(index, patches)
                    x = jnp.concatenate([x[:, :num_prefix], patches.astype(x.dtype)], axis=1)
                return x, (patches, aux)

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
            return body

        tap_params = None if taps is None else taps.params
        graphdef, block_state = nnx.split(self.blocks)
        if self.global_blocks is None:
            tokens, (layers, aux) = jax.lax.scan(
                step(graphdef), tokens,
                (block_state, tap_params, jnp.arange(cfg.depth, dtype=jnp.int32)))
        else:
            global_graphdef, global_state = nnx.split(self.global_blocks)
            tokens, (layers, aux) = self._grouped_scan(
                step(graphdef), step(global_graphdef), tokens, block_state, global_state,
                tap_params)
        normed = tokens if self.norm is None else self.norm(tokens)
        return ViTOutput(tokens=tokens, normed=normed, layers=layers, hook_aux=aux, grid=grid,
                         num_prefix=num_prefix)

    def _grouped_scan(self, window_body, global_body, tokens, window_state, global_state,
                      tap_params=None):
        """SAM's layout: G groups of (period - 1) windowed blocks and one global block, as a scan
        over groups holding a scan over the windowed blocks: two compiled block bodies. The
        taps' per-block parameters (in block order) are split the same way."""
        cfg = self.config
        groups = len(cfg.global_blocks)
        period = cfg.depth // groups
        window_state = jax.tree.map(
            lambda a: a.reshape(groups, period - 1, *a.shape[1:]), window_state)
        by_group = jax.tree.map(lambda a: a.reshape(groups, period, *a.shape[1:]), tap_params)
        window_taps = jax.tree.map(lambda a: a[:, :-1], by_group)
        global_taps = jax.tree.map(lambda a: a[:, -1], by_group)

        def group(x, scanned):
            layer_states, layer_taps, global_layer, global_tap, g = scanned
            first = g * period
            x, (patches, aux) = jax.lax.scan(
                window_body, x,
                (layer_states, layer_taps, first + jnp.arange(period - 1, dtype=jnp.int32)))
            x, (last, last_aux) = global_body(x, (global_layer, global_tap, first + period - 1))
            append = lambda many, one: jnp.concatenate([many, one[None]], axis=0)  # noqa: E731
            return x, (append(patches, last), jax.tree.map(append, aux, last_aux))

        tokens, (layers, aux) = jax.lax.scan(
            group, tokens, (window_state, window_taps, global_state, global_taps,
                            jnp.arange(groups, dtype=jnp.int32)))
        flatten = lambda a: a.reshape(cfg.depth, *a.shape[2:])  # noqa: E731
        return tokens, (flatten(layers), jax.tree.map(flatten, aux))
