"""Every method of the paper's Table 3 as a config variant: trainable counts through
`summary.parameter_counts` (as `--mode summary` prints them) against the paper, and only the
method's own parameters and the head trainable. Training and evaluating them: test_compare.py."""

import pytest

import tests.tiny  # noqa: F401  (puts the repository root on sys.path for `configs`)
from spectralmoe_jax.comparison import PAPER_COUNTS
from spectralmoe_jax.run_config import parse
from spectralmoe_jax.summary import parameter_counts

# Trainable adapter parameters on DINOv3 ViT-L (d 1024, 24 blocks): the paper's Table 3 where
# the released code reaches it, and what the released SET and FADA modules hold
# (docs/methods.md: 6.13 M and 11.65 M are not reproducible from them).
VIT_L = {"lora": 786_432, "adaptformer": 3_220_992, "vpt": 3_686_400, "rein": 2_990_081,
         "depthforge": 2_990_081, "spectralmoe": 5_737_985, "set": 7_546_881,
         "fada": 2_045_441}
# The parameters each method adds, by path under `adapter/`.
OWN = {
    "lora": {"layers/a_q", "layers/b_q", "layers/a_v", "layers/b_v"},
    "adaptformer": {"layers/adapter_norm/scale", "layers/adapter_norm/bias",
                    "layers/down_proj/kernel", "layers/down_proj/bias", "layers/up_proj/kernel",
                    "layers/up_proj/bias"},
    "vpt": {"prompts"},
}
_SHARED = {"scale", "transform/kernel", "transform/bias", "merge/kernel", "merge/bias",
           "mlp_token2feat/kernel", "mlp_token2feat/bias", "mlp_delta_f/kernel",
           "mlp_delta_f/bias"}
_SECOND = {"mlp_token2feat2/kernel", "mlp_token2feat2/bias", "mlp_delta_f2/kernel",
           "mlp_delta_f2/bias"}
OWN["depthforge"] = _SHARED | {"learnable_tokens_a", "learnable_tokens_b"}
OWN["set"] = OWN["depthforge"] | _SECOND | {"learnable_tokens2"}
OWN["fada"] = OWN["depthforge"] | _SECOND | {"learnable_tokens_a2", "learnable_tokens_b2"}


def counts(variant, **model):
    from configs import flair

    config = flair.get_config(variant)
    for key, value in model.items():
        section, field = key.split(".")
        config.model[section][field] = value
    return parameter_counts(parse(config).model, depth=8)


def trainable(counts_, part):
    return sum(c["trainable"] for name, c in counts_["modules"].items()
               if name.split("/")[0] == part)


@pytest.mark.parametrize("method", sorted(VIT_L))
def test_trainable_counts_on_vit_l_match_table_3_or_the_released_code(method):
    got = counts(method)
    assert trainable(got, "adapter") == VIT_L[method]
    paper = PAPER_COUNTS[method][(1024, 24)]
    if method in ("set", "fada"):
        assert abs(VIT_L[method] / 1e6 - paper) > 1.0  # the documented gap
    else:
        assert abs(VIT_L[method] / 1e6 - paper) <= 0.01
    # Only the method's parameters and the head train; the frozen backbones hold none.
    modules = got["modules"]
    assert {name.split("/")[0] for name, c in modules.items() if c["trainable"]} <= {"adapter",
                                                                                      "head"}
    for name, c in modules.items():
        assert c["trainable"] == (0 if name.split("/")[0] in ("vfm", "depth") else c["total"])
    if method in OWN:
        assert {name.split("/", 1)[1].removesuffix("/value") for name in modules
                if name.startswith("adapter/")} == \
            OWN[method]
    assert got["trainable"] == trainable(got, "adapter") + trainable(got, "head")


def test_heads_follow_the_released_methods():
    """Plain head (learned query features and positions) for the in-block methods and the
    frozen baseline, REIN's (queries from the tokens, `querys2feat`) for the token methods,
    plus the query correction module for DepthForge: 4,336,705 parameters at d 1024."""
    head = {m: trainable(counts(m), "head") for m in ("frozen", "lora", "rein", "set",
                                                       "depthforge", "spectralmoe")}
    assert head["lora"] == head["frozen"]
    assert head["set"] == head["rein"] != head["frozen"]
    assert head["depthforge"] - head["rein"] == 4_336_705
    assert head["spectralmoe"] < head["frozen"]  # the released head drops its query positions


def test_sam_h_counts_of_the_token_methods():
    """SAM-H (d 1280, 32 blocks): REIN and DepthForge reach Table 3's 4.51 M; SET and FADA as
    released hold other counts than 9.21 / 16.59 M (docs/methods.md)."""
    sam = {"vfm.preset": "sam_vith16"}
    got = {m: trainable(counts(m, **sam), "adapter") for m in ("rein", "depthforge", "set", "fada")}
    assert got == {"rein": 4_510_721, "depthforge": 4_510_721, "set": 11_886_081,
                   "fada": 3_087_361}
    assert abs(got["rein"] / 1e6 - PAPER_COUNTS["rein"][(1280, 32)]) <= 0.01
