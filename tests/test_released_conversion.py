"""Converting what users bring: released MMSegmentation checkpoints whole or in parts, with the
settings their origin implies, and bad checkpoints reported in one line naming every key."""

import json
import os

import numpy as np
import pytest
import torch
import transformers as hf
from flax import nnx
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig

from spectralmoe_jax.build import build_segmentor
from spectralmoe_jax.conversion import load
from spectralmoe_jax.conversion.convert import convert_checkpoint
from spectralmoe_jax.conversion.rules import ConversionError, compact_names, flatten_state
from spectralmoe_jax.conversion.segmentor import checkpoint_parts, convert_trained_parts
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.run_config import parse
from tests.released_reference import ReleasedDepthMoE, load_released, torch_float
from tests.conftest import relative_error
from tests.test_main import main
from tests.test_mask2former_conversion import to_mmseg
from tests.test_spectral_moe import SPECTRAL, released_state
from tests.test_vit import dinov2_hf, randomize
from tests.test_vit_conversion import original_dinov2, original_dinov3
from tests.tiny import tiny_config


def tiny():
    config = tiny_config()
    config.model.vfm.overrides.num_heads = 4  # head dim 8, as the DINOv3 helper's rope periods
    return config


def build(config):
    return build_segmentor(parse(config).model).model


def adapter_config(model_config) -> AdapterConfig:
    a, vit = model_config.adapter, model_config.vfm.overrides
    return AdapterConfig(num_layers=vit.depth, width=vit.width, num_experts=a.num_experts,
                         rank=a.rank, num_tokens=a.num_tokens, num_queries=a.num_queries,
                         query_dim=a.query_dim)


def released_head(config, seed=0) -> dict:
    """A random `decode_head.*` of the released head for the config's decoder: a tiny HF
    Mask2Former renamed to mmdet's keys, its backbone-facing convolutions given the VFM width,
    and no `query_embed` (the released head deletes it)."""
    d, width = config.model.decoder, config.model.vfm.overrides.width
    torch.manual_seed(seed)
    config = hf.Mask2FormerConfig(
        backbone_config=SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=d.hidden_dim, mask_feature_size=d.hidden_dim, hidden_dim=d.hidden_dim,
        encoder_feedforward_dim=d.encoder_ffn_dim, dim_feedforward=d.decoder_ffn_dim,
        encoder_layers=d.encoder_layers, decoder_layers=d.decoder_layers + 1,
        num_attention_heads=d.encoder_heads, num_queries=d.num_queries, num_labels=config.data.num_classes)
    model = randomize(Mask2FormerForUniversalSegmentation(config), seed)
    state = to_mmseg({k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(seed)
    for key in list(state):
        if ".input_convs." in key and key.endswith("conv.weight") or "lateral_convs.0.conv.weight" in key:
            state[key] = rng.normal(size=(d.hidden_dim, width, 1, 1)).astype(np.float32)
    return {k: v for k, v in state.items() if not k.startswith("decode_head.query_embed")}


def full_checkpoint(config) -> dict:
    """Everything a released backbone wrapper and head hold: DINOv3 (`backbone.*`), PromptDA
    (`backbone.depth_anything.*`, DPT head included), `backbone.depthmoe.*`, `decode_head.*`."""
    vfm = hf.DINOv3ViTModel(hf.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=16, num_register_tokens=4, num_channels=4))
    vfm_state = {k: v.numpy() for k, v in randomize(vfm, 1).state_dict().items()}
    depth_state = {k: v.numpy() for k, v in dinov2_hf(image_size=518, patch=14).state_dict().items()}
    state = {"backbone." + k: v for k, v in original_dinov3(vfm_state, np.random.default_rng(0)).items()}
    state.update(original_dinov2(depth_state, prefix="backbone.depth_anything.pretrained."))
    state["backbone.depth_anything.depth_head.scratch.output_conv.weight"] = np.zeros((1, 8, 1, 1))
    state.update(released_state(adapter_config(config.model)))
    state.update(released_head(config))
    return state


def save_pth(state: dict, path) -> str:
    torch.save({"meta": {"iter": 3}, "state_dict": {k: torch.tensor(np.asarray(v)) for k, v in state.items()}},
               path)
    return str(path)


def trainable(model) -> dict:
    parts = {name: getattr(model, name) for name in ("adapter", "head", "vfm", "depth")}
    return {f"{name}/{k}": np.asarray(v) for name, module in parts.items()
            for k, v in flatten_state(nnx.state(module, nnx.Param)).items()}


# --- whole and partial checkpoints -------------------------------------------------------------

def test_full_mmseg_checkpoint_converts_in_one_call(tmp_path, capsys):
    config = tiny()
    state = full_checkpoint(config)
    assert checkpoint_parts(state) == ("adapter", "head", "vfm", "depth")
    path = save_pth(state, tmp_path / "iter_80000.pth")
    out = str(tmp_path / "converted")
    convert_checkpoint(parse(config), path, out)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, lines
    assert "adapter + head (model.adapter.compat='released')" in lines[0], lines[0]
    assert f"--checkpoint={out}/trained" in lines[0] and f"vfm.checkpoint={out}/vfm" in lines[1]
    assert load.read_meta(f"{out}/trained")["implied"] == {"compat": "released"}

    # The converted folders load the released math though the config sets no compat, and hold
    # the arrays the .pth converts to (the .pth route: the next test).
    config.model.checkpoint = f"{out}/trained"
    config.model.vfm.checkpoint = f"{out}/vfm"
    config.model.depth.checkpoint = f"{out}/depth"
    model = build(config)
    assert (model.adapter.config.compat, model.adapter.config.fusion) == ("released", "diagonal")
    loaded = trainable(model)
    from_pth = convert_trained_parts(state, model)
    for key in from_pth:
        np.testing.assert_array_equal(loaded[key], from_pth[key], err_msg=key)
    # Every part holds the file's values, not an initialisation.
    np.testing.assert_array_equal(loaded["adapter/experts_b"][1, 2],
                                  state[SPECTRAL + "experts_b.1.2"])
    np.testing.assert_array_equal(loaded["head/transformer_decoder/class_head/bias"],
                                  state["decode_head.cls_embed.bias"])
    np.testing.assert_array_equal(loaded["vfm/blocks/norm1/scale"][1], state["backbone.blocks.1.norm1.weight"])
    np.testing.assert_array_equal(loaded["depth/blocks/norm2/bias"][0],
                                  state["backbone.depth_anything.pretrained.blocks.0.norm2.bias"])


def test_released_weights_select_the_released_math_without_settings(tmp_path):
    """A released-named `.pth` as `model.checkpoint`: the adapter built is the released
    `DepthMoE`, computing what the released code computes on the same tokens."""
    config = tiny()
    state = {**released_state(adapter_config(config.model)), **released_head(config)}
    config.model.checkpoint = save_pth(state, tmp_path / "released.pth")
    model = build(config)
    assert model.adapter.config.compat == "released" and model.adapter.config.fusion == "diagonal"
    c = model.adapter.config
    rng = np.random.default_rng(0)
    f_v, f_d = (rng.normal(size=(2, 6, c.width)).astype(np.float32) for _ in range(2))
    ours, _ = model.adapter(1, f_v, f_d, train=False)
    moe = load_released(ReleasedDepthMoE(c.num_layers, c.width, c.num_experts, c.rank,
                                         c.num_tokens, c.query_dim, c.top_k), state, SPECTRAL).eval()
    with torch.no_grad():
        reference, _ = moe(torch_float(np.concatenate([np.zeros((2, 5, c.width)), f_v], 1)),
                           torch_float(np.concatenate([np.zeros((2, 1, c.width)), f_d], 1)), 1)
    assert relative_error(ours, reference[:, 5:].numpy()) <= 1e-5

    # A config that names the math keeps it (to fine-tune released weights with the paper's).
    config.model.adapter.compat = "paper"
    kept = parse(config).model.segmentor({"adapter": {"compat": "released"}})
    assert kept.adapter.compat == "paper"


def test_bare_adapter_file_converts(tmp_path, capsys):
    """`depthmoe.*` alone (a released checkpoint's adapter, unwrapped); the command line itself
    runs in `test_vit_problems_on_the_command_line`."""
    config = tiny()
    adapter = {k[len("backbone."):]: v for k, v in released_state(adapter_config(config.model)).items()}
    path = save_pth(adapter, tmp_path / "depthmoe.pth")
    convert_checkpoint(parse(config), path, str(tmp_path / "out"))
    assert ": adapter (model.adapter.compat='released')" in capsys.readouterr().out
    converted = load.open_checkpoint(str(tmp_path / "out"))
    assert converted.implied == {"compat": "released"} and converted.holds == "trained"
    np.testing.assert_array_equal(converted.state["adapter/experts_a"][1, 2],
                                  adapter["depthmoe.experts_a.1.2"])


def test_bare_head_file_converts(tmp_path, capsys):
    config = tiny()
    path = save_pth(released_head(config), tmp_path / "head.pth")
    convert_checkpoint(parse(config), path, str(tmp_path / "out"))
    assert ": head, " in capsys.readouterr().out
    config.model.checkpoint = str(tmp_path / "out")
    model = build(config)  # the adapter is initialised (logged): a head implies nothing of it
    assert model.adapter.config.compat == "paper"
    np.testing.assert_array_equal(np.asarray(model.head.transformer_decoder.class_head.bias[...]),
                                  released_head(config)["decode_head.cls_embed.bias"])


# --- errors: every offending key, one line -------------------------------------------------------

def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_every_adapter_problem_in_one_error(tmp_path):
    config = tiny()
    c = adapter_config(config.model)
    state = released_state(c)
    del state[SPECTRAL + "experts_b.0.2"]
    for j in range(2):
        del state[f"{SPECTRAL}w_gate.{c.num_layers - 1}.{j}"]  # the last layer: only the model knows it
    state[SPECTRAL + "experts_a.1.0"] = np.zeros((c.num_tokens, c.rank + 1), np.float32)
    state[SPECTRAL + "surprise"] = np.zeros(1, np.float32)
    state[SPECTRAL + "std"] = np.full(1, 2.0, np.float32)
    path = save_pth(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(parse(config), path, str(tmp_path / "out"))
    message = one_line(error)
    for part in ("experts_b (entries (0, 2) of 0..1 x 0..2)",
                 "w_gate (entries (1, 0), (1, 1) of 0..1 x 0..1)",
                 "backbone.depthmoe.experts_a.1.0 -> experts_a[1, 0]: checkpoint (16, 3) vs (16, 2) in the other layers",
                 "backbone.depthmoe.surprise", "backbone.depthmoe.std"):
        assert part in message, (part, message)
    assert message.startswith("adapter: ")


def test_problems_of_several_parts_in_one_error(tmp_path):
    config = tiny()
    state = full_checkpoint(config)
    del state["backbone.norm.bias"]
    del state["decode_head.cls_embed.bias"]
    state["decode_head.transformer_decoder.layers.1.self_attn.attn.in_proj_weight"] = np.zeros((5, 32))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(parse(config), save_pth(state, tmp_path / "bad.pth"), str(tmp_path / "out"))
    message = one_line(error)
    assert "head: " in message and "vfm: " in message and "adapter" not in message
    assert "transformer_decoder/class_head/bias" in message
    assert "in_proj_weight: shape (5, 32) is not 3 stacked projections" in message
    assert "vfm: missing from the checkpoint: norm/bias" in message


def test_vit_problems_on_the_command_line(tmp_path):
    """issue 13, item 3: two layers of one tensor missing in a 4-block model, `norm.bias`
    missing and one mis-shaped block tensor: one line naming all, no traceback."""
    vfm = hf.DINOv3ViTModel(hf.DINOv3ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        patch_size=16, num_register_tokens=4, num_channels=4))
    state = {k: v.numpy() for k, v in randomize(vfm, 2).state_dict().items()}
    for layer in (1, 3):
        del state[f"model.layer.{layer}.attention.o_proj.weight"]
    del state["norm.bias"]
    state["model.layer.2.norm1.weight"] = np.zeros(48, np.float32)
    path = save_pth(state, tmp_path / "dinov3.pth")
    # The demo's random-backbone variant: a 4-block DINOv3 of width 64.
    run = main("--config", "configs/demo.py:random", "--mode", "convert", "--input", path,
               "--output", str(tmp_path / "out"), workdir=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("error")]
    for part in ("blocks/attn/proj/kernel (layers 1, 3 of 0..3)", "norm/bias",
                 "model.layer.2.norm1.weight -> blocks/norm1/scale[2]: checkpoint (48,) vs (64,) in the other layers"):
        assert part in line, (part, line)


def test_compact_names_fold_layer_indices():
    keys = [f"blocks.{i}.attn.qkv.weight" for i in (0, 1, 2, 5)] + ["norm.bias", "w.1.3", "w.2.4"]
    keys += [f"x.{i}.{j}" for i in (0, 1) for j in (3, 4)]
    assert compact_names(keys) == ("blocks.{0..2, 5}.attn.qkv.weight, norm.bias, w.1.3, w.2.4, "
                                   "x.{0..1}.{3..4}")
