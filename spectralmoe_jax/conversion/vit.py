"""PyTorch ViT checkpoints -> `models.vit.VisionTransformer`, and Orbax save / restore.

Naming schemes (`scheme=`; 'auto' tells them apart by their keys):
- 'dinov2'      facebookresearch/dinov2 `.pth`: `patch_embed.proj`, `pos_embed`, `cls_token`,
                `register_tokens`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `mlp.fc1` or the fused
                SwiGLU `mlp.w12`; block-chunked checkpoints (`blocks.C.N.`) too.
- 'dinov3'      facebookresearch/dinov3 `.pth`: `storage_tokens`, `rope_embed.periods` (checked
                against the config, then dropped), `attn.qkv.bias_mask` (multiplied into the bias,
                as `LinearKMaskedBias` does), `mlp.w1/w2/w3`.
- 'hf_dinov2'   HF `Dinov2Model` / `Dinov2WithRegistersModel`: hub files
                (`attention.attention.query`, `mlp.weights_in`) and the in-memory names of
                transformers 5 (`attention.q_proj`, `mlp.gate_proj`); q, k, v are concatenated
                into our fused qkv.
- 'hf_dinov3'   HF `DINOv3ViTModel` (`layer.N.` on the hub, `model.layer.N.` in memory); its missing
                key bias is the zero that `mask_k_bias` implies.
- 'promptda'    PromptDA `.ckpt`: the DINOv2 encoder under `pipeline.pretrained.`; the DPT head is
                dropped.
- 'promptda_hf' HF `PromptDepthAnythingForDepthEstimation`: the `backbone.` Dinov2Backbone; neck
                and head dropped.
- 'dofa'        zhu-xlab/DOFA `.pth` and torchgeo's `torchgeo.models.dofa.DOFA` (the same names):
                timm blocks, `fc_norm` (or `norm`) as the final norm, the dynamic patch embedding
                by `conversion.dofa_embedding`; with position='sincos' the stored fixed table is
                dropped (recomputed for the input grid).
Keys each scheme drops on purpose (mask tokens, heads) are listed in `_IGNORED`; with
`final_norm=False` the checkpoint's final norm is dropped too (DOFA's pretrained files have none;
the segmentor never uses it). Any other key that no rule consumes, any parameter left unfilled and
any shape mismatch is a ConversionError.

The naming scheme also tells which code the weights were made for, and so how that code resizes
the position table to other input sizes (SPEC 5.2): `implied_settings(scheme, config)` names the
ViTConfig fields it implies, `apply_implied_settings` fills those the config leaves unset (None).

Options of the released SpectralMoE `tools/convert_models`: `resize_patch` (patch kernel to
`config.patch_size`, e.g. 14 -> 16, bicubic), `resize_pos` (learned table to `config.pos_grid`,
bicubic, align_corners=False), `stem` ('cyclic' as released or 'timm') for `config.in_channels`
bands from an RGB kernel.

Files are opened and converted by the one loading path, `conversion/load.py`; `--mode convert`
writes the converted arrays once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from spectralmoe_jax.conversion.rules import (
    ConversionError,
    Rule,
    apply_rules,
    conv_kernel,
    linear_kernel,
)
from spectralmoe_jax.models import resize
from spectralmoe_jax.models.rope import rope_periods
from spectralmoe_jax.models.vit import ViTConfig

SCHEMES = ("dinov2", "dinov3", "hf_dinov2", "hf_dinov3", "promptda", "promptda_hf", "dofa")
_FAMILY = {"dinov2": "dinov2", "hf_dinov2": "dinov2", "promptda": "dinov2",
           "promptda_hf": "dinov2", "dinov3": "dinov3", "hf_dinov3": "dinov3", "dofa": "dofa"}

# Prefix (regex) stripped from every key before the table; keys outside it are unexpected.
_PREFIX = {"promptda": r"(?:pipeline\.)?pretrained\.", "promptda_hf": r"backbone\."}
_IGNORED: dict[str, tuple[str, ...]] = {
    "dinov2": (r"mask_token", r"head\..*"),
    "dinov3": (r"mask_token", r"head\..*", r"local_cls_norm\..*"),  # local norm: training only
    "hf_dinov2": (r"embeddings\.mask_token",),
    "hf_dinov3": (r"embeddings\.mask_token", r"rope_embeddings\.inv_freq"),
    "promptda": (r"mask_token", r"(?:pipeline\.)?depth_head\..*", r"(?:pipeline\.)?_(?:mean|std)"),
    "promptda_hf": (r"embeddings\.mask_token", r"neck\..*", r"head\..*"),
    "dofa": (r"mask_token", r"head\..*"),
}


# --- transforms and rule helpers ---------------------------------------------------------------

def _rows(x: np.ndarray) -> np.ndarray:
    """[1, n, D] token or table parameters -> [n, D]."""
    return x.reshape(-1, x.shape[-1])


def _linear(source: str, target: str, layer: bool = True) -> list[Rule]:
    suffix = "[{layer}]" if layer else ""
    return [Rule(source + r"\.weight", target + "/kernel" + suffix, linear_kernel),
            Rule(source + r"\.bias", target + "/bias" + suffix)]


def _norm(source: str, target: str, layer: bool = True) -> list[Rule]:
    suffix = "[{layer}]" if layer else ""
    return [Rule(source + r"\.weight", target + "/scale" + suffix),
            Rule(source + r"\.bias", target + "/bias" + suffix)]


def _blocks(block: str, *, qkv: str, proj: str, ls: tuple[str, str], mlp: dict[str, str]):
    """Per-block rules. `block` matches 'prefix.N.' with the layer index as group 1; `mlp` maps
    source module names to ours (fc1/fc2 or w1/w2/w3)."""
    rules = [*_norm(block + "norm1", "blocks/norm1"), *_norm(block + "norm2", "blocks/norm2"),
             *_linear(block + qkv, "blocks/attn/qkv"), *_linear(block + proj, "blocks/attn/proj"),
             Rule(block + ls[0], "blocks/ls1/gamma[{layer}]"),
             Rule(block + ls[1], "blocks/ls2/gamma[{layer}]")]
    for source, ours in mlp.items():
        rules += _linear(block + rf"mlp\.{source}", f"blocks/mlp/{ours}")
    return rules


def _mlp_names(config: ViTConfig, mlp: tuple[str, str], swiglu: tuple[str, str, str]):
    names = swiglu if config.ffn == "swiglu" else mlp
    ours = ("w1", "w2", "w3") if config.ffn == "swiglu" else ("fc1", "fc2")
    return dict(zip(names, ours))


def _original_rules(config: ViTConfig) -> list[Rule]:
    """facebookresearch dinov2 / dinov3 and timm (DOFA) names; `blocks.C.N.` is block-chunked."""
    return [
        Rule(r"patch_embed\.proj\.weight", "patch_embed/kernel", conv_kernel),
        Rule(r"patch_embed\.proj\.bias", "patch_embed/bias"),
        Rule(r"cls_token", "cls_token", _rows),
        Rule(r"(?:register_tokens|storage_tokens)", "register_tokens", _rows),
        Rule(r"pos_embed", "pos_embed", _rows),
        *_blocks(r"blocks\.(?:\d+\.)?(\d+)\.", qkv=r"attn\.qkv", proj=r"attn\.proj",
                 ls=(r"ls1\.gamma", r"ls2\.gamma"),
                 mlp=_mlp_names(config, ("fc1", "fc2"), ("w1", "w2", "w3"))),
        *_norm(r"(?:norm|fc_norm)", "norm", layer=False),
    ]


def _hf_dinov2_rules(config: ViTConfig) -> list[Rule]:
    return [
        Rule(r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel",
             conv_kernel),
        Rule(r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias"),
        Rule(r"embeddings\.cls_token", "cls_token", _rows),
        Rule(r"embeddings\.register_tokens", "register_tokens", _rows),
        Rule(r"embeddings\.position_embeddings", "pos_embed", _rows),
        *_blocks(r"encoder\.layer\.(\d+)\.", qkv=r"attention\.qkv",
                 proj=r"attention\.(?:o_proj|output\.dense)",
                 ls=(r"layer_scale1\.lambda1", r"layer_scale2\.lambda1"),
                 mlp=_mlp_names(config, ("fc1", "fc2"),
                                ("gate_proj", "up_proj", "(?:down_proj|weights_out)"))),
        *_norm(r"layernorm", "norm", layer=False),
    ]


def _hf_dinov3_rules(config: ViTConfig) -> list[Rule]:
    return [
        Rule(r"embeddings\.patch_embeddings\.weight", "patch_embed/kernel", conv_kernel),
        Rule(r"embeddings\.patch_embeddings\.bias", "patch_embed/bias"),
        Rule(r"embeddings\.cls_token", "cls_token", _rows),
        Rule(r"embeddings\.register_tokens", "register_tokens", _rows),
        *_blocks(r"(?:model\.)?layer\.(\d+)\.", qkv=r"attention\.qkv",
                 proj=r"attention\.o_proj",
                 ls=(r"layer_scale1\.lambda1", r"layer_scale2\.lambda1"),
                 mlp=_mlp_names(config, ("up_proj", "down_proj"),
                                ("gate_proj", "up_proj", "down_proj"))),
        *_norm(r"norm", "norm", layer=False),
    ]


def _dofa_rules(config: ViTConfig) -> list[Rule]:
    from spectralmoe_jax.conversion.dofa_embedding import dofa_embedding_rules

    rules = [rule for rule in _original_rules(config) if not rule.source.startswith("patch_embed")
             and (config.position == "learned" or rule.source != "pos_embed")]
    return dofa_embedding_rules("patch_embed.", "patch_embed/") + rules


_RULES = {"dinov2": _original_rules, "dinov3": _original_rules, "promptda": _original_rules,
          "hf_dinov2": _hf_dinov2_rules, "promptda_hf": _hf_dinov2_rules,
          "hf_dinov3": _hf_dinov3_rules, "dofa": _dofa_rules}


# --- pre-passes: fused and split tensors, buffers ----------------------------------------------

_HF_QKV = {"q": r"(?:q_proj|attention\.query)", "k": r"(?:k_proj|attention\.key)",
           "v": r"(?:v_proj|attention\.value)"}


def _fuse_qkv(state: dict) -> dict:
    """Separate HF q/k/v projections -> one '<stem>.qkv.{weight,bias}' ([q; k; v] rows)."""
    out, groups = {}, {}
    for key, value in state.items():
        for part, pattern in _HF_QKV.items():
            match = re.fullmatch(rf"(.*)\.{pattern}\.(weight|bias)", key)
            if match:
                groups.setdefault((match[1], match[2]), {})[part] = value
                break
        else:
            out[key] = value
    for (stem, kind), parts in groups.items():
        if kind == "bias" and "k" not in parts and {"q", "v"} <= set(parts):
            parts["k"] = np.zeros_like(parts["q"])  # HF DINOv3: key_bias=False, i.e. masked
        missing = sorted(set("qkv") - set(parts))
        if missing:
            raise ConversionError(f"{stem}: the {kind} of projection(s) {missing} is missing")
        out[f"{stem}.qkv.{kind}"] = np.concatenate([parts[p] for p in "qkv"], axis=0)
    return out


def _split_rows(state: dict, fused: str, names: tuple[str, str]) -> dict:
    """A fused SwiGLU input projection '<stem>.{fused}' ([gate; up] rows) -> two tensors."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(rf"(.*)\.{fused}\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        if value.shape[0] % 2:
            raise ConversionError(f"{key}: fused SwiGLU rows {value.shape[0]} are not even")
        first, second = np.split(value, 2, axis=0)
        out[f"{match[1]}.{names[0]}.{match[2]}"] = first
        out[f"{match[1]}.{names[1]}.{match[2]}"] = second
    return out


def _dinov3_buffers(state: dict, config: ViTConfig) -> dict:
    """Multiplies `attn.qkv.bias_mask` into the bias and checks `rope_embed.periods`; drops both."""
    state = dict(state)
    for key in [key for key in state if key.endswith(".attn.qkv.bias_mask")]:
        mask, bias_key = state.pop(key), key[: -len("_mask")]
        if not np.all(np.isfinite(mask)):
            raise ConversionError(f"{key} holds non-finite values (an uninitialised mask)")
        if bias_key not in state:
            raise ConversionError(f"{key} has no bias {bias_key} to mask")
        state[bias_key] = state[bias_key] * mask
    if "rope_embed.periods" in state:
        periods = state.pop("rope_embed.periods")
        head_dim = config.width // config.num_heads
        expected = rope_periods(head_dim, config.rope_base)
        if periods.shape != expected.shape or not np.allclose(periods, expected, rtol=1e-5):
            raise ConversionError(
                f"rope_embed.periods (shape {periods.shape}, first {periods.ravel()[:3]}) differs "
                f"from base {config.rope_base} at head dim {head_dim} ({expected[:3]})")
    return state


def _prepare(state: dict, scheme: str, config: ViTConfig) -> dict:
    if scheme in _PREFIX:
        prefix = _PREFIX[scheme]
        state = {re.sub("^" + prefix, "", key): value for key, value in state.items()}
    if scheme in ("hf_dinov2", "hf_dinov3", "promptda_hf"):
        state = _split_rows(_fuse_qkv(state), "weights_in", ("gate_proj", "up_proj"))
    else:
        state = _split_rows(state, "w12", ("w1", "w2"))
    if scheme == "dinov3":
        state = _dinov3_buffers(state, config)
    return state


def detect_scheme(keys) -> str:
    """Names the checkpoint's naming scheme from its keys."""
    keys = list(keys)

    def has(pattern):
        return any(re.match(pattern, key) for key in keys)

    if has(r"(?:pipeline\.)?pretrained\.(?:blocks|patch_embed)\."):
        return "promptda"
    if has(r"backbone\.embeddings\.patch_embeddings\.projection\."):
        return "promptda_hf"
    if has(r"embeddings\.patch_embeddings\.projection\."):
        return "hf_dinov2"
    if has(r"embeddings\.patch_embeddings\.weight"):
        return "hf_dinov3"
    if has(r"patch_embed\.weight_generator\."):
        return "dofa"
    if has(r"(?:storage_tokens|rope_embed\.periods)$"):
        return "dinov3"
    if has(r"patch_embed\.proj\.weight"):
        return "dinov2"
    raise ConversionError(f"cannot tell the naming scheme of a checkpoint with keys "
                          f"{sorted(keys)[:8]}...; pass scheme= one of {SCHEMES}")


def checkpoint_scheme(state_dict: Mapping[str, Any], scheme: str = "auto", *,
                      prefix: str = "") -> str:
    """The naming scheme of the (sub-)checkpoint under `prefix`: `scheme` itself unless 'auto'."""
    if scheme != "auto":
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected 'auto' or one of {SCHEMES}")
        return scheme
    return detect_scheme(select_prefix(state_dict, prefix))


def select_prefix(state_dict: Mapping[str, Any], prefix: str, where: str = "") -> dict:
    """The keys under `prefix` (a sub-model of a larger checkpoint), without it."""
    if not prefix:
        return dict(state_dict)
    state = {key[len(prefix):]: value for key, value in state_dict.items()
             if key.startswith(prefix)}
    if not state:
        raise ConversionError(f"{where or 'the checkpoint'}: no key starts with prefix {prefix!r}")
    return state


# --- what the weights' origin implies ----------------------------------------------------------

# Where each scheme's weights are run, for the log line.
_ORIGIN = {"dinov2": "facebookresearch/dinov2", "hf_dinov2": "HF transformers",
           "promptda": "PromptDA (its copy of facebookresearch/dinov2)",
           "promptda_hf": "HF transformers (PromptDepthAnything)",
           "dofa": "the released SpectralMoE DOFA converter", "dinov3": "facebookresearch/dinov3",
           "hf_dinov3": "HF transformers"}


def implied_settings(scheme: str, config: ViTConfig) -> dict[str, Any]:
    """ViTConfig field values that weights of naming `scheme` imply: the position-table resize of
    the code they come from (SPEC 5.2). Empty where nothing is implied (RoPE, fixed sin-cos).

    - facebookresearch/dinov2 (`interpolate_pos_encoding`): scale factor (h + 0.1) / M without
      registers; the register models (hub `*_reg`) pass the output size with antialias.
    - PromptDA's `torchhub/facebookresearch_dinov2_main`: always (h + 0.1) / M, no antialias.
    - HF `Dinov2Model` (and PromptDepthAnything's Dinov2Backbone): output size, no antialias;
      `Dinov2WithRegistersModel`: output size with antialias.
    - DOFA never resizes at run time (its table must fit); the released converter resizes to
      the output size without antialias, which is what a size other than the table's gets.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if config.position != "learned" or scheme in ("dinov3", "hf_dinov3"):
        return {}
    registers = config.num_register_tokens > 0
    offset, antialias = {
        "dinov2": (0.0, True) if registers else (0.1, False),
        "promptda": (0.1, False),
        "hf_dinov2": (0.0, registers),
        "promptda_hf": (0.0, False),
        "dofa": (0.0, False),
    }[scheme]
    return {"pos_interp_offset": offset, "pos_interp_antialias": antialias}


def apply_implied_settings(config, implied: Mapping[str, Any], *, origin: str = ""):
    """`config` (any frozen dataclass) with each implied field set where the config leaves it None.

    A value the user set wins; where it differs from the implied one, the log line says so.
    Logs one line when anything is implied.
    """
    if not implied:
        return config
    unset = {name: value for name, value in implied.items() if getattr(config, name) is None}
    kept = {name: getattr(config, name) for name in implied if name not in unset}
    parts = [", ".join(f"{name}={value!r}" for name, value in unset.items())] if unset else []
    differ = [f"{name}={value!r} (the weights imply {implied[name]!r})"
              for name, value in kept.items() if value != implied[name]]
    if differ:
        parts.append("kept as configured: " + ", ".join(differ))
    if parts:
        logging.warning("%s: %s", origin or type(config).__name__, "; ".join(parts))
    return dataclasses.replace(config, **unset)


def config_for_checkpoint(state_dict: Mapping[str, Any], config: ViTConfig,
                          scheme: str = "auto", *, prefix: str = "") -> ViTConfig:
    """`config` with the settings the checkpoint's naming scheme implies filled in (logged)."""
    scheme = checkpoint_scheme(state_dict, scheme, prefix=prefix)
    return apply_implied_settings(
        config, implied_settings(scheme, config),
        origin=f"ViT weights named {scheme!r}, as {_ORIGIN[scheme]} resizes the position table")


# --- options of the released converters --------------------------------------------------------

def _adapt(params: dict, config: ViTConfig, *, resize_patch: bool, resize_pos: bool,
           stem: str | None) -> dict:
    stems = {None: None, "cyclic": resize.adapt_stem_cyclic, "timm": resize.adapt_stem_timm}
    if stem not in stems:
        raise ValueError(f"stem={stem!r}; expected None, 'cyclic' or 'timm'")
    kernel = params.get("patch_embed/kernel")
    if kernel is not None and stem is not None and kernel.shape[2] != config.in_channels:
        kernel = stems[stem](kernel, config.in_channels)
    if kernel is not None and resize_patch and kernel.shape[0] != config.patch_size:
        kernel = resize.resize_patch_kernel(kernel, config.patch_size)
    if kernel is not None:
        params["patch_embed/kernel"] = kernel
    table = params.get("pos_embed")
    rows = 1 + config.pos_grid[0] * config.pos_grid[1]
    if table is not None and resize_pos and table.shape[0] != rows:
        params["pos_embed"] = resize.resize_pos_embed(table, config.pos_grid)
    return params


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ViTConfig,
                       scheme: str = "auto", *, prefix: str = "",
                       allow_unexpected: Sequence[str] = (), resize_patch: bool = False,
                       resize_pos: bool = False, stem: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch ViT state dict -> {our parameter path: array}.

    `prefix` selects a sub-model of a larger checkpoint (e.g. 'backbone.' or
    'depth_anything.pretrained.'): keys outside it are ignored, keys inside lose it.
    """
    state = {key: np.asarray(value) for key, value in select_prefix(state_dict, prefix).items()}
    scheme = checkpoint_scheme(state, scheme)
    if _FAMILY[scheme] != config.family:
        raise ConversionError(f"a {scheme!r} checkpoint holds a {_FAMILY[scheme]} ViT, but the "
                              f"config is of family {config.family!r}")
    state = _prepare(state, scheme, config)
    ignored = _IGNORED[scheme]
    if scheme == "dofa" and config.position != "learned":
        ignored += (r"pos_embed",)  # DOFA's fixed sin-cos table is recomputed, not loaded
    rules = _RULES[scheme](config)
    if not config.final_norm:  # a final norm in the checkpoint is dropped, not an error
        ignored += tuple(rule.source for rule in rules if rule.target.startswith("norm/"))
        rules = [rule for rule in rules if not rule.target.startswith("norm/")]
    params = apply_rules(state, rules, allow_unexpected=(*ignored, *allow_unexpected))
    return _adapt(params, config, resize_patch=resize_patch, resize_pos=resize_pos, stem=stem)
