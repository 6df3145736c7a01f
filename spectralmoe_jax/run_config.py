"""The run configuration, typed: the experiment's ConfigDict parsed once, at start, into frozen
dataclasses.

`configs/*.py` return an `ml_collections.ConfigDict` (built from `config_lib`), which the command
line overrides field by field (`--config.train.batch_size=4`). `parse(config)` checks every key,
fills what other sections determine (the adapter's width is the VFM's, the decoder's classes the
dataset's) and returns a `RunConfig`: the only form of the configuration the rest of the package
reads. The sections' defaults live in their dataclasses, here and beside the code they configure
(`ViTConfig`, `AdapterConfig`, `Mask2FormerConfig`, `LossConfig`, `data/spec.py`), and
`config_lib` writes every one of their fields into the ConfigDict, so any of them can be set from
the command line.

A field whose ConfigDict value is None ("placeholder") is left to the run: the preset's value for
ViT fields, what the loaded checkpoint implies (`build.py`), or what another section determines.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from spectralmoe_jax.data.spec import DatasetSpec, dataset_spec
from spectralmoe_jax.errors import ConfigError, unknown_key
from spectralmoe_jax.models.adapters import REIN_FAMILY
from spectralmoe_jax.models.mask2former import Mask2FormerConfig
from spectralmoe_jax.models.segmentor import SegmentorConfig
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import PRESETS, ViTConfig, vit_config
from spectralmoe_jax.training.mask2former_loss import LossConfig


# Released `paramwise_cfg.custom_keys` with decay_mult 0, as substrings of our parameter paths
# (REIN's, SET's, FADA's, DepthForge's `learnable_tokens*` and `scale` among them); VPT's
# prompts are treated as tokens. LoRA's factors and AdaptFormer's projections decay (no key of
# the released recipes names them), AdaptFormer's LayerNorm does not ("norm").
NO_DECAY_KEYS = (
    "norm", "query_embed", "query_feat", "level_embed",
    "experts_a", "experts_b", "w_gate", "w_noise", "scale", "learnable_tokens", "prompts",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The released optimisation recipe (SPEC 2) and the loop's schedule."""
    batch_size: int = 8  # global batch, split over processes and the mesh's data axis
    num_steps: int = 80000  # AdamW steps
    learning_rate: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    poly_power: float = 0.9  # mmengine PolyLR power
    warmup_steps: int = 0  # linear warm-up before the poly decay
    end_learning_rate: float = 0.0  # learning rate at the last step
    clip_grad_norm: float = 0.0  # 0: no clipping
    grad_accum_steps: int = 1  # micro-batches averaged per AdamW step (optax.MultiSteps)
    no_decay_keys: tuple[str, ...] = NO_DECAY_KEYS  # parameter-path substrings without decay
    log_every: int = 50  # steps between metric records
    checkpoint_every: int = 1000  # steps between checkpoints
    eval_every: int = 0  # steps between evaluations on eval.split (0: only at the end, if set)
    keep_checkpoints: int = 3  # latest checkpoints kept (plus the best by mIoU)
    validate_data: bool = True  # check every tile's header before the first step
    tensorboard: bool = True  # TensorBoard event files beside metrics.jsonl
    # A workdir holding a different run (another model, data or loss: `RunConfig.identity`, or
    # another parameter tree) is refused; with restart=True that run is moved into
    # workdir/previous_run and this one starts from step 0. A workdir holding this same run
    # resumes either way (a relaunched job loses nothing).
    restart: bool = False

    def __post_init__(self):
        _at_least(self, 1, "batch_size", "num_steps", "grad_accum_steps", "log_every",
                  "checkpoint_every", "keep_checkpoints")
        _at_least(self, 0, "eval_every", "warmup_steps", "learning_rate", "weight_decay",
                  "clip_grad_norm", "end_learning_rate")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    mode: str = "whole"  # 'whole' image or 'slide' windows
    window: int = 512  # sliding window size (mode 'slide')
    stride: int = 341  # sliding window stride (REIN: 512 / 341)
    batch_size: int = 4  # windows per model call
    flip: bool = False  # average with the horizontally flipped prediction
    split: str = "target"  # the data split evaluated
    report: bool = True  # HTML report with panels and routing maps (eval mode)
    allow_untrained: bool = False  # eval / predict without trained weights (random adapter, head)

    def __post_init__(self):
        _one_of(self, "mode", ("whole", "slide"))
        _at_least(self, 1, "window", "stride", "batch_size")
        if self.mode == "slide" and self.stride > self.window:
            raise ValueError(f"stride {self.stride} > window {self.window} would leave pixels "
                             "uncovered")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    window: int = 512  # window size over a scene
    overlap: int = 128  # overlap between windows (Hann-blended)
    flip: bool = False  # flip test-time augmentation
    probabilities: bool = False  # also write per-class probability bands
    routing_maps: bool = False  # also write the top-1 expert maps
    labels: str = "codes"  # 'codes': the dataset's own label codes (docs/gis.md); 'ids': train ids
    probability_dtype: str = "uint8"  # probability bands: 'uint8' (255 p) or 'float16'
    vector: bool = False  # also polygons per class (GeoPackage)
    min_area: float = 0.0  # drop polygons smaller than this (CRS units squared)

    def __post_init__(self):
        _at_least(self, 1, "window")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap {self.overlap} must be in [0, window={self.window})")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`--mode export`: ONNX (QGIS Deepness, onnxruntime) and jax.export at a fixed tile size."""
    tile_size: int = 512  # the exported tile, pixels a side (a multiple of twice the patch)
    opset: int = 17  # ONNX opset
    resolution_cm: float = 0.0  # Deepness' ground resolution; 0: from the check tile


# Table 3's rows in the paper's order (config_lib.METHODS names them all).
TABLE3_METHODS = ("frozen", "lora", "adaptformer", "vpt", "set", "fada", "rein", "depthforge",
                  "spectralmoe")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """`--mode compare` (comparison.py): the method variants trained and evaluated alike."""
    methods: tuple[str, ...] = TABLE3_METHODS  # the variants to train and evaluate, table order


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: a strategy's rule table (`sharding.STRATEGIES`) and its axis sizes."""
    strategy: str = "dp"  # 'dp' | 'fsdp' | 'tensor' | 'expert'
    data: int = -1  # devices along the batch axis; -1: all the other axes leave
    fsdp: int = 1  # devices the weights' width axis is split over (strategies fsdp, tensor)
    tensor: int = 1  # devices MLP and attention projections are split over (strategy tensor)
    expert: int = 1  # devices the adapter's experts are split over (strategy expert)


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
    """Where a frozen backbone's weights come from."""
    checkpoint: str = ""  # a PyTorch file (.pth / .safetensors / ...) or a converted Orbax folder
    checkpoint_scheme: str = "auto"  # naming scheme (conversion/vit.py SCHEMES) or 'auto'
    checkpoint_prefix: str = ""  # sub-model prefix inside a larger checkpoint, e.g. 'backbone.'
    stem: str = "cyclic"  # RGB kernel to C bands: 'cyclic' (released) or 'timm' (repeat, rescale)

    def __post_init__(self):
        from spectralmoe_jax.conversion.vit import SCHEMES

        _one_of(self, "stem", ("cyclic", "timm"))
        _one_of(self, "checkpoint_scheme", ("auto", *SCHEMES))


def _at_least(config, low, *names: str) -> None:
    """A ValueError naming the field (run_config._build makes it a ConfigError)."""
    for name in names:
        value = getattr(config, name)
        if not value >= low:  # also catches NaN
            raise ValueError(f"{name}={value!r} must be >= {low}")


def _one_of(config, name: str, choices) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name}={getattr(config, name)!r} must be one of {tuple(choices)}")


@dataclasses.dataclass(frozen=True)
class BackboneSection:
    """A ViT as configured: a preset, the fields set explicitly, and its weights."""
    preset: str  # a ViT preset (models/vit.py PRESETS): family, size and layout
    overrides: Mapping[str, Any]  # ViTConfig fields set in the config (not None)
    weights: WeightsConfig
    enabled: bool = True  # False: no such backbone (depth: no depth encoder)
    bands: tuple[int, ...] = ()  # depth only: the input bands fed as R, G, B

    def vit(self, dtype: str, implied: Mapping[str, Any] | None = None) -> ViTConfig:
        """preset < settings the checkpoint implies < fields set in the config."""
        return vit_config(self.preset, **{"dtype": dtype, **(implied or {}), **self.overrides})


@dataclasses.dataclass(frozen=True)
class ModelSection:
    dtype: str  # compute dtype of every part: 'bfloat16' or 'float32'; parameters stay float32
    vfm: BackboneSection
    depth: BackboneSection
    adapter: Mapping[str, Any] | None  # AdapterConfig fields set in the config; None: no adapter
    decoder: Mapping[str, Any]  # Mask2FormerConfig fields set in the config
    feature_layers: tuple[int, ...] | None  # blocks to the decoder; None: 7/11/15/23 of 24, scaled
    wavelengths: tuple[float, ...]  # per input band, micrometres (DOFA); None: the data's
    checkpoint: str  # trained adapter + head: released .pth, converted folder, workdir
    convert_target: str  # `--mode convert` of a foundation-model file: 'vfm' or 'depth'
    num_classes: int
    neck: str = "resize"  # 'resize' | 'clip_fpn' (the released CLIP wrapper's pyramid)
    adapter_layers: tuple[int, ...] | None = None  # VFM blocks with the adapter; None: all

    def segmentor(self, implied: Mapping[str, Mapping[str, Any]] | None = None) -> SegmentorConfig:
        """The resolved model; `implied` holds per part ('vfm', 'depth', 'adapter') the settings
        its checkpoint implies, applied unless the config sets them."""
        implied = implied or {}
        vfm = self.vfm.vit(self.dtype, implied.get("vfm"))
        depth = self.depth.vit(self.dtype, implied.get("depth")) if self.depth.enabled else None
        adapter = None
        if self.adapter is not None:
            adapter = _build(AdapterConfig, _dtype_named({
                "num_layers": vfm.depth, "width": vfm.width, "dtype": self.dtype,
                **implied.get("adapter", {}), **self.adapter}), "model.adapter")
        linked = adapter is not None and adapter.link_token_to_query
        decoder = _build(Mask2FormerConfig, _dtype_named({
            "in_channels": (vfm.width,) * 4, "num_classes": self.num_classes,
            "dtype": self.dtype,
            # Released heads drop their learned query positions and take the adapter's; REIN's
            # (and SET's, FADA's, DepthForge's) also derive their query features from them
            # (`querys2feat`).
            "learn_query_position": not linked,
            "replace_query_feat": linked and adapter.kind in REIN_FAMILY,
            **self.decoder}), "model.decoder")
        layers = self.feature_layers or default_feature_layers(vfm.depth)
        return _build(SegmentorConfig, dict(
            vfm=vfm, depth=depth, depth_bands=self.depth.bands, adapter=adapter, decoder=decoder,
            feature_layers=layers, wavelengths=self.wavelengths, neck=self.neck,
            adapter_layers=self.adapter_layers), "model")

    @property
    def weights(self) -> dict[str, WeightsConfig]:
        return {"vfm": self.vfm.weights, "depth": self.depth.weights}


def _dtype_named(values: dict) -> dict:
    return {**values, "dtype": jnp.dtype(values["dtype"])}


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """The released pattern 7, 11, 15, 23 of 24 blocks, scaled to `depth` blocks."""
    return tuple(max(0, round((i + 1) * depth / 24) - 1) for i in (7, 11, 15, 23))


@dataclasses.dataclass(frozen=True, eq=False)
class RunConfig:
    seed: int
    distributed: bool
    data: DatasetSpec
    model: ModelSection
    loss: LossConfig
    train: TrainConfig
    eval: EvalConfig
    predict: PredictConfig
    mesh: MeshConfig
    compare: CompareConfig
    export: ExportConfig
    source: Any  # the ConfigDict it was parsed from (saved with a run, printed by --mode config)

    def to_json(self) -> dict:
        """Every field of the source config as plain JSON values (workdir/config.json)."""
        return as_json(self.source)

    def identity(self) -> dict:
        """What makes two runs the same run: `run_identity` of this config."""
        return run_identity(self.to_json())


# Config fields that say where the files are or how the run goes, not which run it is: a
# workdir resumes with other values of these, and of every train / eval / predict / mesh field
# (a longer schedule, a lower learning rate after a NaN stop, another device count).
NOT_IDENTITY = {
    "data": ("root", "tfds_data_dir", "num_workers", "value_range", "on_bad_tile"),
    "model": ("convert_target",),
    "model.vfm.overrides": ("attention", "remat"),
    "model.depth.overrides": ("attention", "remat"),
}
# Weight files are compared by file name: a moved file is the same file.
WEIGHT_FILES = ("model.checkpoint", "model.vfm.checkpoint", "model.depth.checkpoint")


def as_json(config) -> dict:
    import json

    return json.loads(json.dumps(_plain(config) if config is not None else {}, default=str))


def run_identity(config: Mapping) -> dict:
    """The run-defining part of a config (as JSON, `RunConfig.to_json`): seed, model, loss and
    data, without `NOT_IDENTITY` and with weight files by name. A resumed workdir must match."""
    import copy
    import os

    out = {key: copy.deepcopy(config.get(key)) for key in ("seed", "model", "loss", "data")}
    for where, keys in NOT_IDENTITY.items():
        node = out
        for part in where.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for key in keys if isinstance(node, dict) else ():
            node.pop(key, None)
    for where in WEIGHT_FILES:
        *parents, key = where.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key):
            node[key] = os.path.basename(os.path.normpath(str(node[key])))
    return out


# --- parsing -----------------------------------------------------------------------------------

TOP_LEVEL = ("seed", "distributed", "data", "model", "loss", "train", "eval", "predict", "export",
             "mesh", "compare")
MODEL_KEYS = ("dtype", "vfm", "depth", "adapter", "decoder", "feature_layers", "wavelengths",
              "checkpoint", "convert_target", "neck", "adapter_layers")
BACKBONE_KEYS = ("preset", "overrides", *(f.name for f in dataclasses.fields(WeightsConfig)))


def check_keys(section: Mapping, known, where: str) -> None:
    """An unknown key is a ConfigError naming it and the nearest known names."""
    known = list(known)
    for key in section:
        if key not in known:
            raise ConfigError(unknown_key(key, known, where))


def _plain(value):
    """ConfigDict -> dict, lists -> tuples (configs must stay hashable: static under jit);
    (None,), which `--config.x=None` gives for a tuple field, -> None."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return None if tuple(value) == (None,) else tuple(_plain(v) for v in value)
    return value


def _set(section: Mapping) -> dict:
    """The fields a section sets: None means 'left to the run'."""
    return {k: v for k, v in _plain(section).items() if v is not None}


def _build(cls, values: Mapping, where: str):
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config {where}: {error}") from error


def _section(cls, config, key: str, **extra):
    section = config.get(key) or {}
    check_keys(section, [f.name for f in dataclasses.fields(cls)], key)
    return _build(cls, {**_set(section), **extra}, key)


def _backbone(section, where: str, data: DatasetSpec, *, depth: bool = False) -> BackboneSection:
    check_keys(section, BACKBONE_KEYS + (("enabled", "bands") if depth else ()), where)
    preset = section.get("preset")
    if preset not in PRESETS:
        near = difflib.get_close_matches(str(preset), list(PRESETS), n=3)
        raise ConfigError(f"config {where}.preset {preset!r} is not a ViT preset"
                          + (f"; did you mean {' or '.join(map(repr, near))}?" if near else
                             f"; known: {', '.join(sorted(PRESETS))}"))
    overrides = section.get("overrides") or {}
    check_keys(overrides, [f.name for f in dataclasses.fields(ViTConfig)], f"{where}.overrides")
    weights = _build(WeightsConfig, {k: v for k, v in _set(section).items()
                                     if k in {f.name for f in dataclasses.fields(WeightsConfig)}},
                     where)
    overrides = _set(overrides)
    if not depth:  # the VFM takes every selected band unless the config says otherwise
        overrides.setdefault("in_channels", data.num_bands)
    return BackboneSection(
        preset=preset, overrides=overrides, weights=weights,
        enabled=bool(section.get("enabled", True)),
        bands=tuple(int(b) for b in (_plain(section.get("bands")) or data.rgb_bands
                                     or (0, 1, 2))))


def _model(config, data: DatasetSpec) -> ModelSection:
    model = config.get("model") or {}
    check_keys(model, MODEL_KEYS, "model")
    adapter = model.get("adapter") or {}
    check_keys(adapter, ["enabled", *(f.name for f in dataclasses.fields(AdapterConfig))],
               "model.adapter")
    decoder = model.get("decoder") or {}
    check_keys(decoder, [f.name for f in dataclasses.fields(Mask2FormerConfig)], "model.decoder")
    adapter_fields = _set(adapter)
    enabled = adapter_fields.pop("enabled", True)
    layers = _plain(model.get("feature_layers"))
    adapter_layers = _plain(model.get("adapter_layers"))
    section = ModelSection(
        dtype=str(model.get("dtype") or "float32"),
        vfm=_backbone(model.get("vfm") or {}, "model.vfm", data),
        depth=_backbone(model.get("depth") or {}, "model.depth", data, depth=True),
        adapter=adapter_fields if enabled else None,
        decoder=_set(decoder),
        feature_layers=None if layers is None else tuple(int(i) for i in layers),
        wavelengths=tuple(float(w) for w in (_plain(model.get("wavelengths")) or data.wavelengths
                                             or ())),
        checkpoint=str(model.get("checkpoint") or ""),
        convert_target=str(model.get("convert_target") or "vfm"),
        num_classes=data.num_classes,
        neck=str(model.get("neck") or "resize"),
        adapter_layers=None if adapter_layers is None else tuple(int(i) for i in adapter_layers))
    section.segmentor()  # every model error at start, before any file is read
    return section


def parse(config) -> RunConfig:
    """The ConfigDict of an experiment -> RunConfig; an unknown key or a value the model cannot
    take is a one-line ConfigError naming it."""
    if isinstance(config, RunConfig):
        return config
    check_keys(config, TOP_LEVEL, "config")
    data = dataset_spec(config.get("data"))
    return RunConfig(
        seed=int(config.get("seed", 0)),
        distributed=bool(config.get("distributed", False)),
        data=data,
        model=_model(config, data),
        loss=_section(LossConfig, config, "loss"),
        train=_section(TrainConfig, config, "train"),
        eval=_section(EvalConfig, config, "eval"),
        predict=_section(PredictConfig, config, "predict"),
        mesh=_section(MeshConfig, config, "mesh"),
        export=_section(ExportConfig, config, "export"),
        compare=_section(CompareConfig, config, "compare"),
        source=config)


def section_config(cls, *, left: tuple[str, ...] = (), **values):
    """A ConfigDict holding every field of the dataclass `cls`: its default, or, for the fields
    named in `left` and those whose default is None, a typed placeholder (None that the command
    line can set); then `values`."""
    from ml_collections import ConfigDict, config_dict

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    out = ConfigDict()
    for name, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else None
        if name in left or default is None:
            out[name] = config_dict.placeholder(_base_type(hints[name]))
            if values.get(name) is not None:
                out[name] = values[name]
        else:
            out[name] = values.get(name, default)
    return out


def _base_type(hint):
    """int | None -> int, tuple[int, int] -> tuple, Any -> str (dtype names)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is not None:
        return origin
    return str if hint is Any else hint
