"""The adapters against re-statements of the released code (tests/released_reference.py).

A tiny DINOv3 (cls + 4 storage tokens, as released) and a tiny DINOv2 depth encoder (HF models,
converted by our converter) run three blocks each; after every block the released `DepthMoE`
refines the visual patch tokens in PyTorch, and our adapter does the same as the ViT's hook. The
released module reads one state dict under the released key names; our model gets it through
`conversion/adapter.py`, with no setting but what the checkpoint implies (`compat='released'`).
Eval and train (the same gate noise injected into both), k = 1 and 2, float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as hf
from flax import nnx

from spectralmoe_jax.conversion.adapter import convert_adapter, implied_settings
from spectralmoe_jax.conversion.rules import load_into_module
from spectralmoe_jax.conversion.vit import convert_state_dict
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE, routing_noise
from spectralmoe_jax.models.vit import VisionTransformer, ViTConfig
from tests.conftest import relative_error
from tests.released_reference import (
    ReleasedDepthMoE, ReleasedLoRAReins, load_released, torch_float)
from tests.test_spectral_moe import REIN, SPECTRAL, released_state
from tests.test_vit import randomize

WIDTH, LAYERS, HEADS, PATCH, IMAGE, STORAGE = 32, 3, 4, 4, 16, 4
ADAPTER = dict(num_layers=LAYERS, width=WIDTH, num_experts=4, rank=4, num_tokens=8,
               num_queries=8, query_dim=16)
TOL = 1e-5


def hf_dinov3():
    config = hf.DINOv3ViTConfig(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, patch_size=PATCH,
                                num_register_tokens=STORAGE)
    return randomize(hf.DINOv3ViTModel(config), seed=11)


def hf_dinov2():
    config = hf.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             patch_size=PATCH, image_size=IMAGE, mlp_ratio=2)
    return randomize(hf.Dinov2Model(config), seed=12)


VFM = ViTConfig(family="dinov3", patch_size=PATCH, width=WIDTH, depth=LAYERS, num_heads=HEADS,
                mlp_dim=48, num_register_tokens=STORAGE, position="rope", norm_eps=1e-5,
                mask_k_bias=True)
DEPTH_VIT = ViTConfig(family="dinov2", patch_size=PATCH, width=WIDTH, depth=LAYERS, num_heads=HEADS,
                      mlp_dim=2 * WIDTH, pos_grid=(IMAGE // PATCH,) * 2)


def ours(module_cls, config, params):
    module = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    load_into_module(module, params)
    return module


def vit_from(reference, config, scheme):
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    return ours(VisionTransformer, config, convert_state_dict(state, config, scheme))


@pytest.fixture(scope="module")
def backbones():
    vfm, depth = hf_dinov3(), hf_dinov2()
    images = np.random.default_rng(5).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    ours_vfm = vit_from(vfm, VFM, "hf_dinov3")
    plain = nnx.jit(lambda vit, x: vit(x).layers)(ours_vfm, jnp.asarray(images))  # no adapter
    return {"hf_vfm": vfm, "hf_depth": depth, "images": images, "plain": np.asarray(plain),
            "vfm": ours_vfm, "depth": vit_from(depth, DEPTH_VIT, "hf_dinov2")}


def config_from_checkpoint(state, **fields) -> AdapterConfig:
    """The adapter config a user gets: their fields, plus what the checkpoint implies."""
    return AdapterConfig(**{**ADAPTER, **implied_settings(state), **fields})


@nnx.jit(static_argnames=("train",))
def run_segmentor_backbone(vfm, depth, adapter, images, rng, train):
    """What `Segmentor.__call__` does up to the feature pyramid: the adapter as the VFM's hook,
    fed the depth encoder's patch tokens of the same layer, the layer folded into the key."""
    depth_layers = depth(images).layers

    def hook(layer, patches):
        layer_rng = None if rng is None else jax.random.fold_in(rng, layer)
        return adapter(layer, patches, depth_layers[layer], train=train, rng=layer_rng)

    out = vfm(images, hook=hook)
    return out.tokens, out.layers, out.hook_aux["balance_loss"], adapter.query_embedding()


def released_run(backbones, state, top_k, noise):
    """The released DINOv3 backbone loop: block, then `depthmoe.forward(x, depth[idx], idx)`."""
    moe = load_released(ReleasedDepthMoE(LAYERS, WIDTH, ADAPTER["num_experts"], ADAPTER["rank"],
                                         ADAPTER["num_tokens"], ADAPTER["query_dim"], top_k),
                        state, SPECTRAL)
    moe.train(noise is not None)
    moe.noise = list(noise or [])
    vfm, depth = backbones["hf_vfm"], backbones["hf_depth"]
    pixels = torch_float(backbones["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        depth_hidden = depth(pixels, output_hidden_states=True).hidden_states[1:]  # with cls
        x = vfm.embeddings(pixels)
        rope = vfm.rope_embeddings(pixels)
        layers, losses = [], []
        for idx, block in enumerate(vfm.model.layer):
            x, loss = moe(block(x, position_embeddings=rope), depth_hidden[idx], idx)
            layers.append(x[:, 1 + STORAGE:].numpy())
            losses.append(float(loss))
        queries = moe.return_auto().numpy()
    assert not moe.noise  # every injected draw was used
    return x.numpy(), np.stack(layers), np.asarray(losses), queries


def noise_draws(rng, batch, tokens, experts):
    """Our gate noise per layer (visual, depth), flattened as the released [B * N, E] rows."""
    draws = []
    for layer in range(LAYERS):
        eps = routing_noise(jax.random.fold_in(rng, layer), layer, (batch, tokens, experts))
        draws += [torch_float(e).reshape(batch * tokens, experts) for e in eps]
    return draws


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_depthmoe_matches_released_code_over_three_layers(backbones, top_k, train):
    state = released_state(AdapterConfig(**ADAPTER), seed=top_k)
    config = config_from_checkpoint(state, top_k=top_k)
    assert (config.compat, config.fusion, config.gate_p) == ("released", "diagonal", 2.0)
    adapter = ours(SpectralMoE, config, convert_adapter(state, config))
    images = jnp.asarray(backbones["images"])
    rng = jax.random.key(3) if train else None
    tokens, layers, losses, queries = run_segmentor_backbone(
        backbones["vfm"], backbones["depth"], adapter, images, rng, train)
    grid = (IMAGE // PATCH) ** 2
    noise = noise_draws(rng, 2, grid, config.num_experts) if train else None
    ref_tokens, ref_layers, ref_losses, ref_queries = released_run(backbones, state, top_k, noise)

    errors = {f"layer {i}": relative_error(layers[i], ref_layers[i]) for i in range(LAYERS)}
    errors["tokens (prefix passed through)"] = relative_error(tokens, ref_tokens)
    errors["balance loss"] = relative_error(losses, ref_losses)
    errors["queries"] = relative_error(queries, ref_queries)
    print(f"k={top_k} train={train}: {errors}")
    assert max(errors.values()) <= TOL, errors
    # The adapter's update is large enough to see, and the routing is not trivial.
    assert relative_error(layers[-1], backbones["plain"][-1]) > 1e-2
    assert min(ref_losses) > 0


def test_paper_math_differs_from_the_released_checkpoint():
    """Without the implied setting the same weights give another model (issue 13, item 1)."""
    state = released_state(AdapterConfig(**ADAPTER), seed=1)
    rng = np.random.default_rng(1)
    f_v, f_d = (rng.normal(size=(2, 16, WIDTH)).astype(np.float32) for _ in range(2))
    moe = load_released(ReleasedDepthMoE(LAYERS, WIDTH, 4, 4, 8, 16, top_k=1), state, SPECTRAL).eval()
    with torch.no_grad():
        reference, _ = moe(torch_float(np.concatenate([np.zeros((2, 5, WIDTH)), f_v], 1)),
                           torch_float(np.concatenate([np.zeros((2, 1, WIDTH)), f_d], 1)), 0)
    update = reference[:, 5:].numpy() - f_v
    for compat, close in (("released", True), ("paper", False)):
        config = AdapterConfig(**ADAPTER, compat=compat, fusion="diagonal")
        adapter = ours(SpectralMoE, config, convert_adapter(state, config))
        out, _ = jax.jit(lambda a, v, d: a(0, v, d, train=False))(adapter, f_v, f_d)
        assert (relative_error(np.asarray(out) - f_v, update) <= TOL) == close, compat


def test_released_combine_follows_the_dispatcher_where_a_gate_underflows():
    """k = 2 with one expert prototype far away: its softmax gate is exactly 0 in float32, so
    `SparseDispatcher` never sends the token there and the combine is over one expert."""
    config = AdapterConfig(**ADAPTER, top_k=2, compat="released")
    state = released_state(config, seed=4)
    layer = 1
    rng = np.random.default_rng(0)
    far = rng.normal(size=WIDTH).astype(np.float32)
    far *= 150 / np.linalg.norm(far)
    for j in range(2):  # prototypes 0 and `far`; experts 2, 3 farther still
        state[f"{SPECTRAL}w_gate.{layer}.{j}"] = np.stack([0 * far, far, -2 * far, -3 * far], 1)
    # Half the tokens sit at prototype 0 (the second expert is ~145 further: its gate underflows),
    # half midway (both gates positive).
    shift = np.where(np.arange(12)[:, None] < 6, 0.0, 0.5) * far
    f_v, f_d = ((rng.normal(size=(2, 12, WIDTH)) + shift).astype(np.float32) for _ in range(2))
    adapter = ours(SpectralMoE, config, convert_adapter(state, config))
    out, aux = nnx.jit(lambda a, v, d: a(layer, v, d, train=False))(adapter, f_v, f_d)

    moe = load_released(ReleasedDepthMoE(LAYERS, WIDTH, 4, 4, 8, 16, top_k=2), state, SPECTRAL).eval()
    prefix = np.zeros((2, 5, WIDTH), np.float32)
    with torch.no_grad():
        gates, _ = moe.gate(torch_float(f_v).reshape(-1, WIDTH), layer, 0)
        ref, loss = moe(torch_float(np.concatenate([prefix, f_v], 1)),
                        torch_float(np.concatenate([prefix[:, :1], f_d], 1)), layer)
    single = ((gates > 0).sum(1) == 1).float().mean()
    assert single == 0.5  # half the tokens lost their second expert
    assert relative_error(out, ref[:, 5:].numpy()) <= TOL
    assert relative_error(aux["balance_loss"], float(loss)) <= TOL


# --- REIN: LoRAReins on DINOv2 (cls only), as ReinsDinoVisionTransformer runs it --------------

def test_rein_matches_released_code_over_three_layers(backbones):
    config = AdapterConfig(**ADAPTER, kind="rein")
    state = released_state(config)
    adapter = ours(SpectralMoE, config, convert_adapter(state, config))
    vfm = backbones["depth"]  # a DINOv2 with its cls token only, as REIN's released backbone
    images = jnp.asarray(backbones["images"])

    @nnx.jit
    def run(vit, adapter, images):
        out = vit(images, hook=lambda layer, patches: adapter(layer, patches, None, train=True))
        return out.tokens, out.layers, adapter.query_embedding()

    tokens, layers, queries = run(vfm, adapter, images)
    reins = load_released(ReleasedLoRAReins(LAYERS, WIDTH, ADAPTER["rank"], ADAPTER["num_tokens"],
                                            ADAPTER["query_dim"]), state, REIN)
    reference = backbones["hf_depth"]
    with torch.no_grad():
        x = reference.embeddings(torch_float(backbones["images"]).permute(0, 3, 1, 2))
        ref_layers = []
        for idx, block in enumerate(reference.encoder.layer):
            x = reins(block(x), idx)
            ref_layers.append(x[:, 1:].numpy())
        ref_queries = reins.return_auto().numpy()
    errors = [relative_error(layers[i], ref_layers[i]) for i in range(LAYERS)]
    errors += [relative_error(tokens, x.numpy()), relative_error(queries, ref_queries)]
    assert max(errors) <= TOL, errors
    assert relative_error(layers[-1], vfm(images).layers[-1]) > 1e-2


# --- the settings a checkpoint implies ------------------------------------------------------

def test_released_weights_imply_the_released_math():
    moe = released_state(AdapterConfig(**ADAPTER))
    assert implied_settings(moe) == {"compat": "released"}
    bare = {k[len("backbone."):]: v for k, v in moe.items()}  # `depthmoe.*` without the wrapper
    assert implied_settings(bare) == {"compat": "released"}
    assert implied_settings(released_state(AdapterConfig(**ADAPTER, kind="rein"))) == {}
    assert implied_settings({"blocks.0.attn.qkv.weight": np.zeros(3)}) == {}


def test_compat_settings_are_checked():
    paper = AdapterConfig(**ADAPTER)
    assert (paper.compat, paper.fusion) == ("paper", "attention")
    released = AdapterConfig(**ADAPTER, compat="released")
    assert released.fusion == "diagonal" and released.released
    assert AdapterConfig(**ADAPTER, compat="released", fusion="add").fusion == "add"
    assert dataclasses.replace(released, top_k=2).fusion == "diagonal"
    with pytest.raises(ValueError, match="fusion='attention' is the paper's Eq. 6"):
        AdapterConfig(**ADAPTER, compat="released", fusion="attention")
    with pytest.raises(ValueError, match="gate_p=1.0"):
        AdapterConfig(**ADAPTER, compat="released", gate_p=1.0)
    with pytest.raises(ValueError, match="compat='bogus'"):
        AdapterConfig(compat="bogus")
    assert not AdapterConfig(**ADAPTER, kind="rein", compat="released").released
