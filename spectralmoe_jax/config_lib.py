"""Building blocks of the experiment configs in `configs/`.

Every config is `base_config(data)` plus the few fields its benchmark changes: the released
recipe (SPEC section 2) lives in the sections' dataclasses (`run_config.py` and beside the
modules they configure), written here into one `ConfigDict` with every field present, so that
`configs/*.py` stay a screen long and the command line can set any field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from spectralmoe_jax.models.mask2former import Mask2FormerConfig
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import PRESETS, ViTConfig
from spectralmoe_jax.run_config import (TABLE3_METHODS, CompareConfig, EvalConfig, ExportConfig,
                                        LossConfig, MeshConfig, PredictConfig, TrainConfig,
                                        WeightsConfig, section_config)

# Fields the run derives from other sections unless a config sets them.
ADAPTER_DERIVED = ("num_layers", "width", "dtype")  # from the VFM and model.dtype
DECODER_DERIVED = ("in_channels", "num_classes", "dtype", "learn_query_position",
                   "replace_query_feat")  # from the VFM, the data and the adapter


def vfm_config(preset: str = "dinov3_vitl16", **overrides) -> ml_collections.ConfigDict:
    """A ViT preset; every ViTConfig field is in `overrides`, None meaning the preset's value
    (`--config.model.vfm.overrides.width=64`)."""
    cfg = section_config(WeightsConfig)
    cfg.preset = preset
    cfg.overrides = section_config(ViTConfig, left=ViT_FIELDS, **overrides)
    return cfg


ViT_FIELDS = tuple(ViTConfig.__dataclass_fields__)


def depth_config(bands=None, preset: str = "promptda_vitl16", **overrides):
    """PromptDA's encoder as released: its patch-14 kernel and 37x37 position table are resized
    on load to patch 16 and 32x32 (preset promptda_vitl16), so depth tokens align one to one with
    DINOv3's. `preset='promptda_vitl14'` runs it at native patch 14 (depth grid resized instead)."""
    cfg = vfm_config(preset, **overrides)
    cfg.enabled = True
    # Which input bands feed the depth encoder as R, G, B; None: config.data.rgb_bands.
    cfg.bands = ml_collections.config_dict.placeholder(tuple)
    if bands is not None:
        cfg.bands = tuple(bands)
    return cfg


def adapter_config(**overrides) -> ml_collections.ConfigDict:
    cfg = section_config(AdapterConfig, left=ADAPTER_DERIVED, **overrides)
    cfg.enabled = True
    return cfg


def decoder_config(**overrides) -> ml_collections.ConfigDict:
    return section_config(Mask2FormerConfig, left=DECODER_DERIVED, **overrides)


def base_config(data: ml_collections.ConfigDict, *, num_steps: int,
                vfm: str = "dinov3_vitl16") -> ml_collections.ConfigDict:
    """The released SpectralMoE recipe on `data` (AdamW 1e-4, wd 0.05, poly 0.9, batch 8)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.distributed = False
    config.data = data
    config.model = ml_collections.ConfigDict(dict(
        dtype="bfloat16",
        vfm=vfm_config(vfm),  # in_channels None: the number of config.data.bands
        depth=depth_config(),
        adapter=adapter_config(),
        decoder=decoder_config(),
        # VFM blocks feeding the decoder; None: the released 7, 11, 15, 23 scaled to the depth.
        feature_layers=ml_collections.config_dict.placeholder(tuple),
        # Per band, um: DOFA needs them; None: config.data.wavelengths.
        wavelengths=ml_collections.config_dict.placeholder(tuple),
        checkpoint="",          # trained adapter + head: released .pth or `--mode convert` output
        convert_target="vfm",   # `--mode convert` of a foundation-model file: 'vfm' or 'depth'
        neck="resize",          # 'clip_fpn': the released CLIP wrapper's trained pyramid
        # VFM blocks followed by the adapter; None: every block (the SAM wrapper: its global ones)
        adapter_layers=ml_collections.config_dict.placeholder(tuple),
    ))
    config.loss = section_config(LossConfig)
    every = max(num_steps // 10, 1)
    config.train = section_config(TrainConfig, num_steps=num_steps, checkpoint_every=every,
                                  eval_every=every)
    config.eval = section_config(EvalConfig)
    config.predict = section_config(PredictConfig)
    config.export = section_config(ExportConfig)
    config.mesh = section_config(MeshConfig)
    config.compare = section_config(CompareConfig)
    return config


# Methods compared in the paper, as variants of one config (`--config configs/flair.py:rein`):
# SpectralMoE, the frozen-backbone baseline, Table 3's other methods (models/adapters/,
# docs/methods.md) and Table 4's ablations.
METHODS = ("spectralmoe", "frozen", "lora", "adaptformer", "vpt", "set", "fada", "rein",
           "depthforge", "no_moe", "no_dual_gating", "no_depth", "no_cross_attention")
assert set(TABLE3_METHODS) <= set(METHODS)  # what `--mode compare` trains by default
# What each method sets, over SpectralMoE's settings (`_METHOD_FIELDS`). Every variant sets
# every one of these fields, so a method applied to any config (another variant's, a command
# line's) is that method. Hyper-parameters (ranks, token counts, prompts) are AdapterConfig's
# defaults, which are the papers' / released configs'. Depth runs only where the method reads it.
METHOD_OVERRIDES: dict[str, dict[str, object]] = {
    "spectralmoe": {},
    "frozen": {"adapter.enabled": False, "depth.enabled": False},
    "lora": {"adapter.kind": "lora", "depth.enabled": False},
    "adaptformer": {"adapter.kind": "adaptformer", "depth.enabled": False},
    "vpt": {"adapter.kind": "vpt", "depth.enabled": False},
    "set": {"adapter.kind": "set", "depth.enabled": False},
    "fada": {"adapter.kind": "fada", "depth.enabled": False},
    "rein": {"adapter.kind": "rein", "depth.enabled": False},
    # DepthForge's released head adds the Dynamic Query Correction Module.
    "depthforge": {"adapter.kind": "depthforge", "decoder.query_correction": True},
    "no_moe": {"adapter.use_moe": False},  # one expert, no gating
    "no_dual_gating": {"adapter.dual_gating": False},  # one gate for both modalities
    "no_depth": {"adapter.use_depth": False, "depth.enabled": False},
    "no_cross_attention": {"adapter.fusion": "add"},  # fusion by addition
}


def _method_fields() -> dict[str, object]:
    """The fields a method variant decides, at SpectralMoE's values (the dataclass defaults)."""
    adapter = {f.name: f.default for f in dataclasses.fields(AdapterConfig)}
    fields = {f"adapter.{name}": adapter[name]
              for name in ("kind", "use_moe", "dual_gating", "use_depth", "fusion")}
    return {**fields, "adapter.enabled": True, "depth.enabled": True,
            "decoder.query_correction": False}


# Model sizes as variants (`configs/flair.py:vits`): the ViT size fields of the standard sizes,
# applied to the VFM and the depth encoder whatever their family (the adapter follows the VFM).
SIZE_FIELDS = ("width", "depth", "num_heads", "mlp_dim")
SIZES = {name: {k: PRESETS[preset][k] for k in SIZE_FIELDS}
         for name, preset in (("vits", "dinov2_vits14"), ("vitb", "dinov2_vitb14"),
                              ("vitl", "dinov2_vitl14"))}


def apply_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """`config` with one of METHODS: SpectralMoE, the frozen baseline, a compared method or a
    Table 4 ablation; whatever method `config` had before."""
    if method not in METHODS:
        raise ValueError(f"unknown method variant {method!r}; known: {', '.join(METHODS)}")
    for key, value in {**_method_fields(), **METHOD_OVERRIDES[method]}.items():
        section, name = key.split(".")
        config.model[section][name] = value
    return config


def apply_size(config: ml_collections.ConfigDict, sizes: dict) -> ml_collections.ConfigDict:
    """The VFM and the depth encoder at `sizes` (width, depth, heads, MLP): the adapter pairs
    their blocks one to one, so both change together."""
    for part in (config.model.vfm, config.model.depth):
        part.overrides.update(sizes)
    return config


def parse_variant(arg: str | None) -> str:
    return (arg or "spectralmoe").strip() or "spectralmoe"


def variant_kinds() -> list[tuple[str, str]]:
    """What `configs/NAME.py:VARIANT` takes: (kind, the words and what they do)."""
    return [("methods", f"{', '.join(METHODS)} (the paper's Tables 3 and 4, docs/methods.md)"),
            ("sizes", f"{', '.join(SIZES)}: the VFM and the depth encoder at ViT-S / B / L "
                      "width, depth, heads and MLP"),
            ("presets", "a ViT preset as the VFM, the depth encoder at its size: "
                        f"{', '.join(sorted(PRESETS))}")]


def variant_help(indent: str = "") -> str:
    """`variant_kinds`, wrapped, one kind a paragraph (--help)."""
    import textwrap

    return "\n".join(textwrap.fill(f"{kind + ':':<9}{text}", width=96, initial_indent=indent,
                                   subsequent_indent=indent + " " * 9)
                     for kind, text in variant_kinds())


def apply_variant(config: ml_collections.ConfigDict, variant: str | None
                  ) -> ml_collections.ConfigDict:
    """`variant`: comma-separated words, at most one of each kind, e.g. 'rein,vits':
      a method (METHODS), a size (SIZES: 'vits', 'vitb', 'vitl'), or a ViT preset name, which
      becomes the VFM (and sizes the depth encoder like it).
    A preset is applied before a size, so 'dinov2_vitl14,vits' is DINOv2 at ViT-S size."""
    words = [w.strip() for w in (variant or "").split(",") if w.strip()]
    kinds = {"method": [w for w in words if w in METHODS],
             "size": [w for w in words if w in SIZES],
             "preset": [w for w in words if w in PRESETS]}
    unknown = [w for w in words if not any(w in found for found in kinds.values())]
    if unknown:
        known = "; ".join(f"{kind} {text}" for kind, text in variant_kinds())
        raise ValueError(f"unknown variant {', '.join(map(repr, unknown))}; known {known}")
    for kind, found in kinds.items():
        if len(found) > 1:
            raise ValueError(f"variant {variant!r} names {len(found)} {kind}s {found}: at most one")
    if kinds["preset"]:
        preset = kinds["preset"][0]
        config.model.vfm.preset = preset
        config.model.vfm.overrides.update({k: None for k in SIZE_FIELDS})
        config.model.depth.overrides.update({k: PRESETS[preset][k] for k in SIZE_FIELDS})
    if kinds["size"]:
        apply_size(config, SIZES[kinds["size"][0]])
    return apply_method(config, kinds["method"][0] if kinds["method"] else "spectralmoe")


def benchmark_config(benchmark: str, variant: str | None, *, num_steps: int,
                     vfm: str = "dinov3_vitl16", num_experts: int = 6,
                     batch_size: int = 8) -> ml_collections.ConfigDict:
    """One of the paper's benchmarks (data/benchmarks.py) with the released recipe, and the
    variant's method, size and VFM (`apply_variant`)."""
    from spectralmoe_jax.data import benchmarks

    config = base_config(benchmarks.get_benchmark(benchmark), num_steps=num_steps, vfm=vfm)
    config.model.adapter.num_experts = num_experts
    config.train.batch_size = batch_size
    return apply_variant(config, variant)
