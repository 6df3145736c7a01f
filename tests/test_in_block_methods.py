"""LoRA, AdaptFormer and VPT inside the frozen ViT (`BlockTaps`, models/vit.py) against PyTorch:
peft's LoRA on HF DINOv3 / DINOv2 and on segment-anything's windowed + global blocks; re-statements
of AdaptFormer's `Adapter` + parallel `Block.forward` and of VPT's `forward_deep_prompt` around
HF's layers. Float32, every block's output."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

from spectralmoe_jax.models import adapters
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import BlockTaps, VisionTransformer
from tests.conftest import relative_error
from tests.test_vit import (DEPTH, WIDTH, check_blocks, dinov2_config, dinov2_hf, dinov3_config,
                            dinov3_hf, hf_states, images_of, ours_from)
from tests.test_vit_families import (block_outputs, build, check_layers, nchw, numpy_state,
                                      sam_config, segment_anything_encoder)


def method(kind, vit, **fields):
    config = AdapterConfig(kind=kind, num_layers=vit.depth, width=vit.width, **fields)
    return adapters.build_adapter(config, vit, rngs=nnx.Rngs(1))


@nnx.jit
def run_with(vit, adapter, images):
    return vit(images, taps=adapter.block_taps(train=False))


def set_stacked(param: nnx.Param, per_layer) -> None:
    param[...] = jnp.asarray(np.stack([np.asarray(x) for x in per_layer]), jnp.float32)


def differs_from_frozen(vit, images, reference_last) -> float:
    """How far the frozen ViT alone is from the adapted reference: the method did something."""
    plain = nnx.jit(lambda m, x: m(x))(vit, images)
    return relative_error(plain.layers[-1], reference_last[:, plain.num_prefix:])


# --- LoRA: peft ----------------------------------------------------------------------------

def peft_lora(reference, targets, rank=4, alpha=8.0):
    """peft's LoRA on `reference` in place, B random (init_lora_weights=False), scale alpha / r."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        init_lora_weights=False)
    model = get_peft_model(reference, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape))
    return model.eval()


def lora_factors(layers, module_of):
    """Per block, peft's lora_A [r, in] / lora_B [out, r] -> our A [in, r] / B [r, out]."""
    linear = [module_of(layer) for layer in layers]
    a = [m.lora_A["default"].weight.detach().numpy().T for m in linear]
    b = [m.lora_B["default"].weight.detach().numpy().T for m in linear]
    return a, b


def load_lora(lora, layers, names):
    """names: our target -> the peft-wrapped submodule path inside each reference block."""
    for target, path in names.items():
        a, b = lora_factors(layers, lambda layer: layer.get_submodule(path))
        set_stacked(getattr(lora.layers, f"a_{target}"), a)
        set_stacked(getattr(lora.layers, f"b_{target}"), b)


def test_lora_on_q_and_v_matches_peft_on_hf_dinov3():
    reference = dinov3_hf()
    vit = ours_from(reference, dinov3_config(), "hf_dinov3")
    peft_lora(reference, ["q_proj", "v_proj"])
    lora = method("lora", vit.config, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v"))
    load_lora(lora, reference.model.layer, {"q": "attention.q_proj", "v": "attention.v_proj"})
    images = images_of(32, 48, seed=11)
    hidden, last = hf_states(reference, images)
    check_blocks(run_with(vit, lora, jnp.asarray(images)), hidden, last)
    assert differs_from_frozen(vit, jnp.asarray(images), hidden[-1]) > 1e-2


def test_lora_on_every_linear_matches_peft_on_hf_dinov2():
    """q, k, v, the output projection and both MLP linears, with a learned position table."""
    reference = dinov2_hf(image_size=32)
    vit = ours_from(reference, dinov2_config(image_size=32), "hf_dinov2")
    names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
             "proj": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    peft_lora(reference, list({path.split(".")[-1] for path in names.values()}), rank=2,
              alpha=6.0)
    lora = method("lora", vit.config, lora_rank=2, lora_alpha=6.0, lora_targets=tuple(names))
    load_lora(lora, reference.encoder.layer, names)
    images = images_of(32, 48, seed=12)
    hidden, last = hf_states(reference, images)
    check_blocks(run_with(vit, lora, jnp.asarray(images)), hidden, last)
    assert differs_from_frozen(vit, jnp.asarray(images), hidden[-1]) > 1e-2


def test_lora_on_fused_qkv_matches_peft_on_sam_windowed_and_global_blocks():
    """segment-anything's fused qkv, proj and lin1 (our fc1): the taps' per-block parameters
    follow SAM's scan over groups of windowed blocks and a global block."""
    reference = segment_anything_encoder()
    vit = build(sam_config(), numpy_state(reference))
    peft_lora(reference, r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.lin1)")
    lora = method("lora", vit.config, lora_rank=4, lora_alpha=8.0,
                  lora_targets=("qkv", "proj", "fc1"))
    load_lora(lora, reference.blocks, {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.lin1"})
    images = images_of(64, 64, seed=13)
    hidden = block_outputs(reference.blocks, lambda: reference(nchw(images)))
    check_layers(run_with(vit, lora, jnp.asarray(images)), hidden)
    assert differs_from_frozen(vit, jnp.asarray(images), hidden[-1]) > 1e-2


# --- AdaptFormer: a re-statement of `Adapter` and the parallel `Block.forward` ----------------

class Adapter(torch.nn.Module):
    """ShoufaChen/AdaptFormer `models/adapter.py` (init irrelevant: weights are set)."""

    def __init__(self, d_model, bottleneck, scale, layernorm):
        super().__init__()
        self.adapter_layernorm_option = layernorm
        self.adapter_layer_norm_before = torch.nn.LayerNorm(d_model)
        self.scale = scale
        self.down_proj = torch.nn.Linear(d_model, bottleneck)
        self.up_proj = torch.nn.Linear(bottleneck, d_model)

    def forward(self, x):
        if self.adapter_layernorm_option == "in":
            x = self.adapter_layer_norm_before(x)
        up = self.up_proj(torch.relu(self.down_proj(x)))  # dropout: eval
        up = up * self.scale
        if self.adapter_layernorm_option == "out":
            up = self.adapter_layer_norm_before(up)
        return up


def attach_parallel_adapters(layers, adapters_):
    """`Block.forward`, ffn_option='parallel': residual + (mlp branch + adapter(x)), x the input
    of norm2; on HF's layers: a hook keeps norm2's input, another adds the adapter to the MLP
    branch (after layer_scale2) before the layer adds the residual."""
    handles = []
    for layer, adapter in zip(layers, adapters_):
        kept = {}
        handles.append(layer.norm2.register_forward_pre_hook(
            lambda m, args, kept=kept: kept.__setitem__("x", args[0])))
        handles.append(layer.layer_scale2.register_forward_hook(
            lambda m, args, out, kept=kept, adapter=adapter: out + adapter(kept["x"])))
    return handles


@pytest.mark.parametrize("layernorm", ["in", "out"])
def test_adaptformer_matches_its_parallel_block_on_hf_dinov3(layernorm):
    reference = dinov3_hf()
    vit = ours_from(reference, dinov3_config(), "hf_dinov3")
    torch.manual_seed(1)
    released = [Adapter(WIDTH, 8, 0.1, layernorm).eval() for _ in range(DEPTH)]
    with torch.no_grad():
        for adapter in released:
            for name, p in adapter.named_parameters():
                gain = name == "adapter_layer_norm_before.weight"
                p.copy_((1.0 if gain else 0.0) + 0.5 * torch.randn(p.shape))
    ours = method("adaptformer", vit.config, adaptformer_bottleneck=8, adaptformer_scale=0.1,
                  adaptformer_layernorm=layernorm)
    layers = ours.layers

    def stack(get):
        return [get(a).detach().numpy() for a in released]

    set_stacked(layers.adapter_norm.scale, stack(lambda a: a.adapter_layer_norm_before.weight))
    set_stacked(layers.adapter_norm.bias, stack(lambda a: a.adapter_layer_norm_before.bias))
    set_stacked(layers.down_proj.kernel, [w.T for w in stack(lambda a: a.down_proj.weight)])
    set_stacked(layers.down_proj.bias, stack(lambda a: a.down_proj.bias))
    set_stacked(layers.up_proj.kernel, [w.T for w in stack(lambda a: a.up_proj.weight)])
    set_stacked(layers.up_proj.bias, stack(lambda a: a.up_proj.bias))
    handles = attach_parallel_adapters(reference.model.layer, released)
    images = images_of(32, 48, seed=14)
    try:
        hidden, last = hf_states(reference, images)
    finally:
        for handle in handles:
            handle.remove()
    check_blocks(run_with(vit, ours, jnp.asarray(images)), hidden, last)
    assert differs_from_frozen(vit, jnp.asarray(images), hidden[-1]) > 1e-2


# --- VPT-deep: a re-statement of `incorporate_prompt` + `forward_deep_prompt` -----------------

def deep_prompt_forward(embed, layers, run_layer, prompts, prefix):
    """VPT's forward on HF layers: the prompts after the prefix (cls, registers) before block 0,
    then before every later block the prompt slots overwritten with that block's prompts.
    Returns every block's output without the prompt slots."""
    batch = embed.shape[0]
    p = prompts.shape[1]
    hidden = torch.cat([embed[:, :prefix], prompts[0].expand(batch, -1, -1), embed[:, prefix:]], 1)
    outputs = []
    for i, layer in enumerate(layers):
        if i > 0:
            hidden = torch.cat([hidden[:, :prefix], prompts[i].expand(batch, -1, -1),
                                hidden[:, prefix + p:]], dim=1)
        hidden = run_layer(layer, hidden)
        outputs.append(torch.cat([hidden[:, :prefix], hidden[:, prefix + p:]], 1).numpy())
    return outputs


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_vpt_deep_matches_prompted_hf_layers(family):
    """DINOv3: the prompts sit among the prefix tokens that RoPE skips; DINOv2: they take no
    position embedding (it was added before)."""
    if family == "dinov3":
        reference, config, scheme, prefix = dinov3_hf(), dinov3_config(), "hf_dinov3", 3
    else:
        reference, config, scheme, prefix = dinov2_hf(2, 32), dinov2_config(2, 32), "hf_dinov2", 3
    vit = ours_from(reference, config, scheme)
    vpt = method("vpt", vit.config, vpt_tokens=5)
    prompts = np.random.default_rng(15).normal(size=(DEPTH, 5, WIDTH)).astype(np.float32)
    vpt.prompts[...] = jnp.asarray(prompts)
    images = images_of(32, 48, seed=16)
    pixels = nchw(images)
    with torch.no_grad():
        embed = reference.embeddings(pixels)
        if family == "dinov3":
            rope = reference.rope_embeddings(pixels)
            layers = reference.model.layer
            run_layer = lambda layer, h: layer(h, position_embeddings=rope)  # noqa: E731
        else:
            layers = reference.encoder.layer
            run_layer = lambda layer, h: layer(h)  # noqa: E731
        hidden = deep_prompt_forward(embed, layers, run_layer, torch.from_numpy(prompts), prefix)
    out = run_with(vit, vpt, jnp.asarray(images))
    assert out.tokens.shape == (2, prefix + 96, WIDTH)  # no prompt slots in the outputs
    check_blocks(out, hidden, None)
    assert differs_from_frozen(vit, jnp.asarray(images), hidden[-1]) > 1e-2


# --- the contract ------------------------------------------------------------------------------

def test_zero_initialised_methods_leave_the_frozen_vit_exactly():
    """LoRA (B = 0) and AdaptFormer (up = 0) start at the frozen model, bit for bit."""
    vit = nnx.jit(lambda: VisionTransformer(dinov3_config(), rngs=nnx.Rngs(0)))()
    images = jnp.asarray(images_of(32, 48, seed=17))
    plain = nnx.jit(lambda m, x: m(x))(vit, images)
    for kind in ("lora", "adaptformer"):
        out = run_with(vit, method(kind, vit.config), images)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))


def combined_taps(vit_config):
    """LoRA on q and v, an AdaptFormer branch and VPT prompts in one BlockTaps, every parameter
    random, so that each gets a gradient."""
    lora = method("lora", vit_config, lora_rank=2)
    former = method("adaptformer", vit_config, adaptformer_bottleneck=4)
    vpt = method("vpt", vit_config, vpt_tokens=3)
    rng = np.random.default_rng(18)
    for module in (lora, former):
        state = nnx.state(module, nnx.Param)
        nnx.update(module, jax.tree.map(
            lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), jnp.float32), state))
    parts = {"lora": lora.block_taps(train=False), "former": former.block_taps(train=False),
             "vpt": vpt.block_taps(train=False)}

    def taps(params):
        def delta(site, p, x):
            owner = "former" if site == "mlp" else "lora"
            return parts[owner].delta(site, p[owner], x)

        return BlockTaps(params=params, sites=parts["lora"].sites | parts["former"].sites,
                         delta=delta, num_prompts=3,
                         prompts=lambda p: parts["vpt"].prompts(p["vpt"]))

    return taps, {name: part.params for name, part in parts.items()}


def test_taps_gradients_are_the_same_under_every_remat_policy():
    """One scan body with prompts, q/v deltas and a parallel branch, differentiated with respect
    to the taps' stacked parameters: 'none', 'dots' and 'full' agree, every leaf gets gradient."""
    reference = dinov3_hf()
    images = jnp.asarray(images_of(32, 48, seed=19))

    def gradients(remat):
        vit = ours_from(reference, dataclasses.replace(dinov3_config(), remat=remat), "hf_dinov3")
        taps, params = combined_taps(vit.config)

        def loss(params):
            out = vit(images, taps=taps(params))
            return jnp.sum(out.layers ** 2) + jnp.sum(out.tokens[:, 0])

        return jax.jit(jax.grad(loss))(params)

    base = jax.tree.leaves(gradients("none"))
    assert all(float(jnp.abs(g).max()) > 0 for g in base)
    for remat in ("dots", "full"):
        for got, want in zip(jax.tree.leaves(gradients(remat)), base):
            assert relative_error(got, want) <= 1e-5, remat


def test_in_block_method_errors_name_the_field():
    sam = sam_config()
    with pytest.raises(ValueError, match="prompt tokens have no place in windowed attention"):
        adapters.check_adapter(AdapterConfig(kind="vpt", num_layers=4, width=WIDTH), sam,
                               depth=False, adapter_layers=None)
    vit = dinov3_config()
    with pytest.raises(ValueError, match="'qkv' is the fused projection; it overlaps"):
        method("lora", vit, lora_targets=("qkv", "q"))
    swiglu = dataclasses.replace(vit, ffn="swiglu")
    with pytest.raises(ValueError, match=r"lora_targets \['fc1'\].*'swiglu'"):
        method("lora", swiglu, lora_targets=("q", "fc1"))
    with pytest.raises(ValueError, match="link_token_to_query: lora has no tokens"):
        adapters.check_adapter(AdapterConfig(kind="lora", link_token_to_query=True), vit,
                               depth=False, adapter_layers=None)
    with pytest.raises(ValueError, match="adapter_layers.*adaptformer works inside every block"):
        adapters.check_adapter(AdapterConfig(kind="adaptformer"), vit, depth=False,
                               adapter_layers=(1,))
