"""The SpectralMoE segmentor (SPEC section 1): frozen VFM + frozen depth encoder, the adapter
after every VFM block, the four-level feature pyramid and the Mask2Former head.

Which parameters train is decided by their path: everything under `vfm/` and `depth/` is
frozen (`is_trainable` below), so the optimiser never sees them and they carry no state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from spectralmoe_jax.models import resize
from spectralmoe_jax.models.mask2former import Mask2FormerConfig, Mask2FormerHead
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig, vit_config

FROZEN_PREFIXES = ("vfm", "depth")
# Released feature pyramid: blocks 7, 11, 15, 23 resized x4, x2, x1, x0.5 -> strides 4..32.
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def dataclass_from_config(cls, fields: Mapping, where: str):
    """Builds a config dataclass, naming any key it does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config {where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(known)}")
    return cls(**fields)


def backbone_config(cfg, dtype: str, where: str) -> ViTConfig:
    """A named preset (e.g. 'dinov3_vitl16') with the config's overrides applied."""
    base = vit_config(cfg.preset)
    overrides = dict(cfg.get("overrides", {}))
    overrides.setdefault("dtype", dtype)
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"config {where}.overrides: unknown key(s) {unknown}")
    return dataclasses.replace(base, **overrides)


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

    def __init__(self, model_config, *, rngs: nnx.Rngs):
        dtype = model_config.get("dtype", "float32")
        self.vfm = VisionTransformer(backbone_config(model_config.vfm, dtype, "model.vfm"), rngs=rngs)
        # DOFA builds its patch embedding from the bands' central wavelengths (micrometres).
        self.wavelengths = tuple(model_config.get("wavelengths") or ())
        if self.vfm.config.family == "dofa" and len(self.wavelengths) != self.vfm.config.in_channels:
            raise ValueError(f"model.wavelengths has {len(self.wavelengths)} values but the DOFA "
                             f"VFM takes {self.vfm.config.in_channels} bands: give one per band")
        depth_cfg = model_config.depth
        self.depth_bands = tuple(depth_cfg.bands) if depth_cfg.enabled else None
        # nnx.data: an optional submodule stays a pytree node even when it is None.
        self.depth = nnx.data(
            VisionTransformer(backbone_config(depth_cfg, dtype, "model.depth"), rngs=rngs)
            if depth_cfg.enabled else None)
        adapter_fields = dict(model_config.adapter)
        adapter = None
        if adapter_fields.pop("enabled", True):
            adapter_fields.setdefault("num_layers", self.vfm.config.depth)
            adapter_fields.setdefault("width", self.vfm.config.width)
            adapter_fields.setdefault("dtype", jnp.dtype(dtype))
            adapter = SpectralMoE(
                dataclass_from_config(AdapterConfig, adapter_fields, "model.adapter"), rngs=rngs)
        self.adapter = nnx.data(adapter)
        self.feature_layers = tuple(model_config.feature_layers)
        if max(self.feature_layers) >= self.vfm.config.depth:
            raise ValueError(f"model.feature_layers {self.feature_layers} exceed the VFM's "
                             f"{self.vfm.config.depth} blocks")
        head_fields = dict(model_config.decoder)
        head_fields.setdefault("in_channels", (self.vfm.config.width,) * 4)
        head_fields.setdefault("dtype", jnp.dtype(dtype))
        if self.adapter is not None and self.adapter.config.link_token_to_query:
            # Released heads drop their learned query positions and take the adapter's.
            head_fields.setdefault("learn_query_position", False)
            # REIN's released head also derives its query features from them (`querys2feat`).
            head_fields.setdefault("replace_query_feat", self.adapter.config.kind == "rein")
        self.head = Mask2FormerHead(
            dataclass_from_config(Mask2FormerConfig, head_fields, "model.decoder"), rngs=rngs)

    def depth_features(self, images: jax.Array, grid: tuple[int, int]) -> jax.Array | None:
        """All depth-block patch tokens [L, B, N, D], forward only (no gradient ever needed)."""
        if self.depth is None:
            return None
        rgb = jnp.take(images, jnp.asarray(self.depth_bands), axis=-1)
        out = self.depth(rgb)
        layers = out.layers
        if out.grid != tuple(grid):  # native patch 14: resize the depth token grid to the visual one
            h, w = out.grid
            maps = rearrange(layers, "l b (h w) d -> (l b) h w d", h=h, w=w)
            maps = jax.image.resize(maps, (maps.shape[0], *grid, maps.shape[-1]), "linear")
            layers = rearrange(maps, "(l b) h w d -> l b (h w) d", l=layers.shape[0])
        return jax.lax.stop_gradient(layers)

    def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None,
                 wavelengths: jax.Array | None = None) -> dict:
        b, h, w, _ = images.shape
        patch = self.vfm.config.patch_size
        grid = (h // patch, w // patch)
        depth_layers = self.depth_features(images, grid)
        if wavelengths is None and self.vfm.config.family == "dofa":
            wavelengths = jnp.asarray(self.wavelengths, jnp.float32)

        hook = None
        if self.adapter is not None:
            adapter = self.adapter

            def hook(layer_index, patch_tokens):
                f_d = None if depth_layers is None else depth_layers[layer_index]
                layer_rng = None if rng is None else jax.random.fold_in(rng, layer_index)
                return adapter(layer_index, patch_tokens, f_d, train=train, rng=layer_rng)

        out = self.vfm(images, hook=hook, wavelengths=wavelengths)
        features = []
        for layer, scale in zip(self.feature_layers, PYRAMID_SCALES):
            fmap = rearrange(out.layers[layer], "b (h w) d -> b h w d", h=out.grid[0], w=out.grid[1])
            features.append(resize_bilinear(fmap, scale))
        query_embedding = self.adapter.query_embedding() if self.adapter is not None else None
        outputs = dict(self.head(features, query_embedding=query_embedding))
        if out.hook_aux is not None:
            # Released: the per-layer balance terms are averaged over the layers.
            outputs["balance_loss"] = jnp.mean(out.hook_aux["balance_loss"])
            outputs["expert_v"] = rearrange(out.hook_aux["expert_v"], "l b (h w) -> b l h w",
                                            h=out.grid[0], w=out.grid[1])
        else:
            outputs["balance_loss"] = jnp.zeros((), jnp.float32)
        return outputs


def is_trainable(path: Sequence, _value=None) -> bool:
    """True for parameters outside the frozen backbones."""
    return bool(path) and str(getattr(path[0], "key", path[0])) not in FROZEN_PREFIXES


def trainable_filter():
    """NNX filter of the trainable parameters."""
    return nnx.All(nnx.Param, lambda path, _: is_trainable(path))


def frozen_filter():
    return nnx.All(nnx.Param, lambda path, _: not is_trainable(path))


def split_model(model: Segmentor):
    """graphdef, trainable params, frozen params, everything else (non-Param variables)."""
    return nnx.split(model, trainable_filter(), frozen_filter(), ...)


def load_backbone(module: VisionTransformer, cfg) -> None:
    """Fills a frozen backbone from `cfg.checkpoint`: an Orbax directory written by the convert
    mode, or a PyTorch file converted on the fly (released options: patch kernel and position
    table resized to the configured patch and grid, multispectral stem by `cfg.stem`)."""
    from spectralmoe_jax.conversion.rules import load_into_module
    from spectralmoe_jax.conversion.torch_io import load_state_dict
    from spectralmoe_jax.conversion.vit import convert_state_dict, restore_params

    path = cfg.checkpoint
    if os.path.isdir(path):
        restore_params(module, path)
        return
    params = convert_state_dict(
        load_state_dict(path), module.config, cfg.get("checkpoint_scheme", "auto"),
        prefix=cfg.get("checkpoint_prefix", ""), resize_patch=True, resize_pos=True,
        stem=cfg.get("stem", "cyclic"))
    load_into_module(module, params)


def build_segmentor(model_config, seed: int = 0) -> Segmentor:
    """The segmentor with its frozen backbones loaded from their checkpoints, when given, and
    its adapter and head from `model.checkpoint` (a released SpectralMoE / REIN MMSegmentation
    checkpoint, or the Orbax directory `--mode convert` writes from one)."""
    model = Segmentor(model_config, rngs=nnx.Rngs(seed))
    for name in FROZEN_PREFIXES:
        module, cfg = getattr(model, name), model_config[name]
        if module is not None and cfg.get("checkpoint"):
            load_backbone(module, cfg)
    if model_config.get("checkpoint"):
        from spectralmoe_jax.conversion.segmentor import load_trained_parts

        load_trained_parts(model, model_config.checkpoint)
    return model
