"""Building blocks of the experiment configs in `configs/`.

Every config is `base_config(data)` plus the few fields its benchmark changes: the released
recipe (SPEC section 2) lives here once, and `configs/*.py` stay a screen long.
"""

from __future__ import annotations

import ml_collections

# Released `paramwise_cfg.custom_keys` with decay_mult 0, as substrings of our parameter paths.
NO_DECAY_KEYS = (
    "norm", "query_embed", "query_feat", "level_embed",
    "experts_a", "experts_b", "w_gate", "w_noise", "scale", "learnable_tokens",
)


def vfm_config(preset: str = "dinov3_vitl16", **overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        preset=preset,
        # Any ViTConfig field; these two are listed so that the command line can set them
        # (--config.model.vfm.overrides.remat=dots): the measured choices of issue 7.
        overrides=dict(dict(attention="auto", remat="none"), **overrides),
        checkpoint="",         # a PyTorch (.pth / .safetensors / ...) or converted Orbax path
        checkpoint_scheme="auto",
        stem="cyclic",         # multispectral stem: 'cyclic' (released) or 'timm' (repeat, rescale)
    ))


def depth_config(bands=(0, 1, 2), preset: str = "promptda_vitl16", **overrides):
    """PromptDA's encoder as released: its patch-14 kernel and 37x37 position table are resized
    on load to patch 16 and 32x32 (preset promptda_vitl16), so depth tokens align one to one with
    DINOv3's. `preset='promptda_vitl14'` runs it at native patch 14 (depth grid resized instead)."""
    cfg = vfm_config(preset, **overrides)
    cfg.enabled = True
    cfg.bands = tuple(bands)      # which input bands feed the depth encoder as R, G, B
    return cfg


def adapter_config(kind: str = "spectral_moe", **overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        enabled=True, kind=kind, num_experts=6, top_k=1, rank=16, num_tokens=100,
        gate_p=2.0, fusion="attention", use_depth=True, dual_gating=True, use_moe=True,
        link_token_to_query=True,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def decoder_config(num_classes: int, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(num_classes=num_classes)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def base_config(data: ml_collections.ConfigDict, *, num_steps: int,
                vfm: str = "dinov3_vitl16") -> ml_collections.ConfigDict:
    """The released SpectralMoE recipe on `data` (AdamW 1e-4, wd 0.05, poly 0.9, batch 8)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.distributed = False
    config.data = data
    config.model = ml_collections.ConfigDict(dict(
        dtype="bfloat16",
        vfm=vfm_config(vfm, in_channels=len(data.bands)),
        depth=depth_config(bands=data.get("rgb_bands") or (0, 1, 2)),
        adapter=adapter_config(),
        decoder=decoder_config(data.num_classes),
        feature_layers=(7, 11, 15, 23),
        wavelengths=tuple(data.get("wavelengths") or ()),  # per band, um: DOFA needs them
        checkpoint="",          # trained adapter + head: released .pth or `--mode convert` output
        convert_target="vfm",   # `--mode convert` of a foundation-model file: 'vfm' or 'depth'
    ))
    config.loss = ml_collections.ConfigDict(dict(num_points=12544))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=8, num_steps=num_steps, learning_rate=1e-4, weight_decay=0.05,
        poly_power=0.9, warmup_steps=0, end_learning_rate=0.0, clip_grad_norm=0.0,
        grad_accum_steps=1, no_decay_keys=NO_DECAY_KEYS, log_every=50,
        checkpoint_every=max(num_steps // 10, 1), eval_every=max(num_steps // 10, 1),
        keep_checkpoints=3, validate_data=True, tensorboard=True,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        mode="whole", window=512, stride=341, batch_size=4, flip=False, split="target",
        report=True,
    ))
    config.predict = ml_collections.ConfigDict(dict(
        window=512, overlap=128, flip=False, probabilities=False, routing_maps=False,
        labels="codes",             # 'codes': the dataset's own label codes; 'ids': train ids
        probability_dtype="uint8",  # probability bands: 'uint8' (255 p) or 'float16'
        vector=False,               # also polygons per class (GeoPackage)
        min_area=0.0,               # drop polygons smaller than this (CRS units squared)
    ))
    # `--mode export`: ONNX (QGIS Deepness, onnxruntime) and jax.export at a fixed tile size.
    config.export = ml_collections.ConfigDict(dict(
        tile_size=512, opset=17, resolution_cm=0.0,  # 0: the resolution of the check tile
    ))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, fsdp=False))
    return config


# Methods compared in the paper, as variants of one config (`--config configs/flair.py:rein`).
METHODS = ("spectralmoe", "frozen", "rein", "no_moe", "no_dual_gating", "no_depth", "no_cross_attention")


def apply_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """SpectralMoE (default), the frozen-backbone baseline, REIN, or a Table 4 ablation."""
    if method not in METHODS:
        raise ValueError(f"unknown method variant {method!r}; known: {', '.join(METHODS)}")
    adapter, depth = config.model.adapter, config.model.depth
    if method == "frozen":           # frozen VFM + Mask2Former, no adapter, no depth
        adapter.enabled = False
        depth.enabled = False
    elif method == "rein":           # REIN: learnable tokens, no experts, gates or depth
        adapter.kind = "rein"
        depth.enabled = False
    elif method == "no_moe":         # one expert, no gating
        adapter.use_moe = False
    elif method == "no_dual_gating":  # one gate shared by both modalities
        adapter.dual_gating = False
    elif method == "no_depth":       # no depth input (and no depth encoder to run)
        adapter.use_depth = False
        depth.enabled = False
    elif method == "no_cross_attention":  # fusion by addition
        adapter.fusion = "add"
    return config


def parse_variant(arg: str | None) -> str:
    return (arg or "spectralmoe").strip() or "spectralmoe"


def benchmark_config(benchmark: str, variant: str | None, *, num_steps: int,
                     vfm: str = "dinov3_vitl16", num_experts: int = 6,
                     batch_size: int = 8) -> ml_collections.ConfigDict:
    """One of the paper's benchmarks (data/benchmarks.py) with the released recipe and a method."""
    from spectralmoe_jax.data import benchmarks

    config = base_config(benchmarks.get_benchmark(benchmark), num_steps=num_steps, vfm=vfm)
    config.model.adapter.num_experts = num_experts
    config.train.batch_size = batch_size
    return apply_method(config, parse_variant(variant))
