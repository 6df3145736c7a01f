"""The jitted adapter on a mesh of 8 simulated CPU devices equals the single-device result.

XLA_FLAGS must be set before jax is imported, so the check runs in a fresh interpreter.
"""

import json
import os
import subprocess
import sys

from tests.conftest import relative_error

SCRIPT = r"""
import json, os
# Backend optimisation level 0 halves the compile time; both sides of the comparison share it.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from spectralmoe_jax.models.spectral_moe import AdapterConfig, SpectralMoE

assert jax.device_count() == 8, jax.devices()
config = AdapterConfig(num_layers=3, width=32, num_experts=4, rank=4, num_tokens=8, num_queries=8,
                       query_dim=16, top_k=2)
graphdef, state = nnx.split(SpectralMoE(config, rngs=nnx.Rngs(0)))
# Random values everywhere (the released init has zero B and gates, which would hide paths).
leaves, treedef = jax.tree.flatten(state)
keys = jax.random.split(jax.random.key(0), len(leaves) + 2)
state = jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
f_v, f_d = (jax.random.normal(k, (8, 24, 32)) for k in keys[-2:])
rng = jax.random.key(5)

@jax.jit
def step(state, f_v, f_d, rng):
    def loss(state):
        out, aux = nnx.merge(graphdef, state)(jnp.int32(1), f_v, f_d, train=True, rng=rng)
        return jnp.mean(out ** 2) + 1e-3 * aux["balance_loss"], (out, aux)
    (value, (out, aux)), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return {"out": out, "balance_loss": aux["balance_loss"], "expert_v": aux["expert_v"],
            "expert_d": aux["expert_d"], "grads": grads}

def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

single = flat(step(state, f_v, f_d, rng))
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
replicated = jax.device_put(state, NamedSharding(mesh, P()))
results = {"single": {k: v.tolist() for k, v in single.items()}}
for name, spec in {"batch": P("data"), "tokens": P(None, "data")}.items():
    sharding = NamedSharding(mesh, spec)
    out = step(replicated, jax.device_put(f_v, sharding), jax.device_put(f_d, sharding), rng)
    assert len(out["out"].sharding.device_set) == 8, out["out"].sharding
    results[name] = {k: v.tolist() for k, v in flat(out).items()}
print("RESULTS" + json.dumps(results))
"""


def test_mesh_of_8_cpu_devices_matches_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.split("RESULTS", 1)[1])
    single = results.pop("single")
    assert any("w_gate" in k for k in single) and any("experts_b" in k for k in single)
    for layout, sharded in results.items():
        assert sharded.keys() == single.keys()
        for key, reference in single.items():
            if "expert" in key and "grads" not in key:
                assert sharded[key] == reference, (layout, key)
            else:
                assert relative_error(sharded[key], reference) < 1e-5, (layout, key)
