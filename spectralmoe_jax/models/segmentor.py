"""The SpectralMoE segmentor (SPEC section 1): frozen VFM + frozen depth encoder, the adapter
after every VFM block (or, for LoRA, AdaptFormer and VPT, inside them: `models/adapters/`), the
four-level feature pyramid and the Mask2Former head.

Which parameters train is decided by their path: everything under `vfm/` and `depth/` is
frozen (`is_trainable` below), so the optimiser never sees them and they carry no state.

Choices the released backbone wrappers make (`models/backbones/depthmoe_*.py`):
- `neck`: 'resize' (bilinear x4, x2, x1, x0.5: the DINOv2 / DINOv3 / DOFA / EVA02 / SAM
  wrappers) or 'clip_fpn' (the CLIP wrapper's trainable pyramid, `neck.py`);
- `adapter_layers`: the VFM blocks followed by the adapter, the adapter's layer i serving the
  i-th of them (default every block; the SAM wrapper: its global-attention blocks);
- a VFM deeper than the depth encoder (SAM-H 32 blocks, PromptDA 24) reads depth block
  floor(l * L_depth / L_vfm) after its block l; a depth encoder of another width (1024 beside
  SAM-H's 1280) is mapped to the VFM width by a trained Linear `depth_proj`. Neither is in the
  released code, which cannot run those pairs (its depth gate is [d_vfm, Ne]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from spectralmoe_jax.models import adapters, resize
from spectralmoe_jax.models.mask2former import Mask2FormerConfig, Mask2FormerHead
from spectralmoe_jax.models.neck import CLIPFeaturePyramid
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig

FROZEN_PREFIXES = ("vfm", "depth")
NECKS = ("resize", "clip_fpn")
# Released feature pyramid: blocks 7, 11, 15, 23 resized x4, x2, x1, x0.5 -> strides 4..32.
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


@dataclasses.dataclass(frozen=True)
class SegmentorConfig:
    """The whole model, resolved (`run_config.ModelSection.segmentor` builds it from a run's
    config)."""
    vfm: ViTConfig
    decoder: Mask2FormerConfig
    adapter: AdapterConfig | None = None  # None: the frozen-backbone baseline
    depth: ViTConfig | None = None  # None: no depth encoder
    depth_bands: tuple[int, ...] = (0, 1, 2)  # input bands fed to the depth encoder as R, G, B
    feature_layers: tuple[int, ...] = (7, 11, 15, 23)  # VFM blocks feeding the pyramid
    wavelengths: tuple[float, ...] = ()  # per band, micrometres: DOFA needs them
    neck: str = "resize"  # 'resize' (bilinear pyramid) | 'clip_fpn' (the CLIP wrapper's)
    adapter_layers: tuple[int, ...] | None = None  # VFM blocks with the adapter; None: every one

    def __post_init__(self):
        if self.adapter_layers is not None:
            object.__setattr__(self, "adapter_layers", tuple(int(l) for l in self.adapter_layers))
            layers = self.adapter_layers
            if (not layers or min(layers) < 0 or max(layers) >= self.vfm.depth
                    or len(set(layers)) != len(layers)):
                raise ValueError(f"model.adapter_layers {layers} must be distinct blocks of the "
                                 f"VFM's {self.vfm.depth}")
            if self.adapter is not None and len(layers) > self.adapter.num_layers:
                raise ValueError(f"model.adapter_layers {layers} need more than the adapter's "
                                 f"{self.adapter.num_layers} layers")
        if self.neck not in NECKS:
            raise ValueError(f"model.neck={self.neck!r}: expected one of {NECKS}")
        if self.vfm.family == "dofa" and len(self.wavelengths) != self.vfm.in_channels:
            raise ValueError(f"model.wavelengths has {len(self.wavelengths)} values but the DOFA "
                             f"VFM takes {self.vfm.in_channels} bands: give one per band")
        if len(self.feature_layers) != len(PYRAMID_SCALES):
            raise ValueError(f"model.feature_layers {self.feature_layers}: give "
                             f"{len(PYRAMID_SCALES)} block indices, one per pyramid level")
        if max(self.feature_layers) >= self.vfm.depth or min(self.feature_layers) < 0:
            raise ValueError(f"model.feature_layers {self.feature_layers} are not blocks of the "
                             f"VFM's {self.vfm.depth}")
        if self.depth is not None and max(self.depth_bands) >= self.vfm.in_channels:
            raise ValueError(f"model.depth.bands {self.depth_bands} are not among the "
                             f"{self.vfm.in_channels} input bands")
        if self.adapter is not None:
            adapters.check_adapter(self.adapter, self.vfm, depth=self.depth is not None,
                                   adapter_layers=self.adapter_layers)


def resize_bilinear(x: jax.Array, scale: float) -> jax.Array:
    """F.interpolate(scale_factor=s, mode='bilinear', align_corners=False) on NHWC maps.

    As jax.image.resize's 'linear' (half-pixel centres, no antialias), from shifted copies
    for these integer factors (models/resize.py): no matmul, no transpose on the GPU.
    """
    if scale == 1.0:
        return x
    b, h, w, c = x.shape
    return resize.resize_bilinear(x, (b, int(round(h * scale)), int(round(w * scale)), c))


class Segmentor(nnx.Module):
    """images [B, H, W, C] -> Mask2Former class and mask logits (+ the adapter's aux losses)."""

    def __init__(self, config: SegmentorConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vfm = VisionTransformer(config.vfm, rngs=rngs)
        # nnx.data: an optional submodule stays a pytree node even when it is None.
        self.depth = nnx.data(
            VisionTransformer(config.depth, rngs=rngs) if config.depth is not None else None)
        self.adapter = nnx.data(adapters.build_adapter(config.adapter, config.vfm, rngs=rngs)
                                if config.adapter is not None else None)
        self.depth_proj = nnx.data(None)
        self.depth_layer_of = None  # VFM block -> the depth block whose tokens it reads
        if config.depth is not None:
            if config.depth.depth != config.vfm.depth:
                self.depth_layer_of = tuple(l * config.depth.depth // config.vfm.depth
                                            for l in range(config.vfm.depth))
            if config.depth.width != config.vfm.width:
                self.depth_proj = nnx.data(nnx.Linear(config.depth.width, config.vfm.width,
                                                      dtype=config.vfm.dtype, rngs=rngs))
        self.neck = nnx.data(CLIPFeaturePyramid(config.vfm.width, rngs=rngs)
                             if config.neck == "clip_fpn" else None)
        self.head = Mask2FormerHead(config.decoder, rngs=rngs)

    def depth_features(self, images: jax.Array, grid: tuple[int, int]) -> jax.Array | None:
        """All depth-block patch tokens [L, B, N, D], forward only (no gradient ever needed)."""
        if self.depth is None:
            return None
        rgb = jnp.take(images, jnp.asarray(self.config.depth_bands), axis=-1)
        out = self.depth(rgb)
        layers = out.layers
        if self.depth_layer_of is not None:
            layers = jnp.take(layers, jnp.asarray(self.depth_layer_of), axis=0)
        if out.grid != tuple(grid):  # native patch 14: resize the depth token grid to the visual one
            h, w = out.grid
            maps = rearrange(layers, "l b (h w) d -> (l b) h w d", h=h, w=w)
            maps = jax.image.resize(maps, (maps.shape[0], *grid, maps.shape[-1]), "linear")
            layers = rearrange(maps, "(l b) h w d -> l b (h w) d", l=layers.shape[0])
        layers = jax.lax.stop_gradient(layers)
        if self.depth_proj is not None:
            layers = self.depth_proj(layers)
        return layers

    def adapter_hook(self, depth_layers, *, train: bool, rng: jax.Array | None):
        """The VFM hook (docs/design.md) running the adapter after its blocks, or None."""
        if self.adapter is None or adapters.in_block(self.config.adapter):
            return None
        adapter = self.adapter
        slots = None
        if self.config.adapter_layers is not None:  # adapter layer i after the i-th listed block
            slots = np.full(self.config.vfm.depth, -1, np.int32)
            slots[list(self.config.adapter_layers)] = np.arange(len(self.config.adapter_layers))

        def hook(layer_index, patch_tokens):
            f_d = None if depth_layers is None else depth_layers[layer_index]
            layer_rng = None if rng is None else jax.random.fold_in(rng, layer_index)
            if slots is None:
                return adapter(layer_index, patch_tokens, f_d, train=train, rng=layer_rng)
            slot = jnp.asarray(slots)[layer_index]
            refined, aux = adapter(jnp.maximum(slot, 0), patch_tokens, f_d, train=train,
                                   rng=layer_rng)
            active = slot >= 0
            if "balance_loss" in aux:
                aux = dict(aux, balance_loss=jnp.where(active, aux["balance_loss"], 0.0))
            return jnp.where(active, refined, patch_tokens), aux

        return hook

    def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None,
                 wavelengths: jax.Array | None = None) -> dict:
        b, h, w, _ = images.shape
        patch = self.vfm.config.patch_size
        grid = (h // patch, w // patch)
        depth_layers = self.depth_features(images, grid)
        if wavelengths is None and self.vfm.config.family == "dofa":
            wavelengths = jnp.asarray(self.config.wavelengths, jnp.float32)

        hook = self.adapter_hook(depth_layers, train=train, rng=rng)
        taps = None
        if self.adapter is not None and adapters.in_block(self.config.adapter):
            taps = self.adapter.block_taps(train=train, rng=rng)
        out = self.vfm(images, hook=hook, wavelengths=wavelengths, taps=taps)
        features = [rearrange(out.layers[layer], "b (h w) d -> b h w d", h=out.grid[0],
                              w=out.grid[1]) for layer in self.config.feature_layers]
        if self.neck is None:
            features = [resize_bilinear(f, scale) for f, scale in zip(features, PYRAMID_SCALES)]
        else:
            features = self.neck(features, train=train)
        query_embedding = self.adapter.query_embedding() if self.adapter is not None else None
        outputs = dict(self.head(features, query_embedding=query_embedding))
        aux = out.hook_aux or {}
        if "balance_loss" in aux:
            # Released: the per-layer balance terms are averaged over the adapted layers.
            layers = self.config.adapter_layers
            count = self.config.vfm.depth if layers is None else len(layers)
            outputs["balance_loss"] = jnp.sum(aux["balance_loss"]) / count
        else:
            outputs["balance_loss"] = jnp.zeros((), jnp.float32)
        if "expert_v" in aux:
            outputs["expert_v"] = rearrange(aux["expert_v"], "l b (h w) -> b l h w",
                                            h=out.grid[0], w=out.grid[1])
        return outputs


def is_trainable(path: Sequence, _value=None) -> bool:
    """True for parameters outside the frozen backbones."""
    return bool(path) and str(getattr(path[0], "key", path[0])) not in FROZEN_PREFIXES


def trained_variables(flat: dict) -> dict:
    """The entries of a flat {'a/b/c': leaf} model state that training changes: every variable
    outside the frozen backbones (parameters, and statistics such as a neck's BatchNorm)."""
    return {k: v for k, v in flat.items() if k.split("/")[0] not in FROZEN_PREFIXES}


def trainable_filter():
    """NNX filter of the trainable parameters."""
    return nnx.All(nnx.Param, lambda path, _: is_trainable(path))


def frozen_filter():
    return nnx.All(nnx.Param, lambda path, _: not is_trainable(path))


def split_model(model: Segmentor):
    """graphdef, trainable params, frozen params, everything else (non-Param variables)."""
    return nnx.split(model, trainable_filter(), frozen_filter(), ...)
