"""Parameter counts by module (the `summary` mode), from shapes only: nothing is allocated."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from spectralmoe_jax.models.segmentor import Segmentor, is_trainable
from spectralmoe_jax.training.optimizer import path_name


def parameter_counts(model_section, depth: int = 2) -> dict:
    """{'total', 'trainable', 'frozen', 'modules': {path prefix: {'total', 'trainable'}}} of the
    model of `model_section` (`RunConfig.model`), from shapes only."""
    config = model_section.segmentor()
    abstract = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    modules: dict[str, dict[str, int]] = {}
    total = trainable = 0
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        train = is_trainable(path)
        total += size
        trainable += size * train
        prefix = "/".join(path_name(path).split("/")[:depth])
        entry = modules.setdefault(prefix, {"total": 0, "trainable": 0})
        entry["total"] += size
        entry["trainable"] += size * train
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "modules": dict(sorted(modules.items()))}


def format_table(counts: dict) -> str:
    rows = [("module", "parameters", "trainable")]
    rows += [(name, f"{c['total']:,}", f"{c['trainable']:,}") for name, c in counts["modules"].items()]
    rows.append(("TOTAL", f"{counts['total']:,}", f"{counts['trainable']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_summary(model_section, workdir: str) -> dict:
    counts = parameter_counts(model_section)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(counts, f, indent=2)
    print(format_table(counts))
    return counts
