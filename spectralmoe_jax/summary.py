"""Parameter counts by part and module (the `summary` mode), from shapes only: nothing is
allocated.

The parts are the segmentor's top-level modules: the frozen `vfm` and `depth` encoders, the
trained `adapter` (the paper's Table 3 counts it alone: 5.74 M for SpectralMoE on a ViT-L) and
the Mask2Former `head` (the paper's "decoder", 20.6 M).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from spectralmoe_jax.models.segmentor import Segmentor, is_trainable
from spectralmoe_jax.training.optimizer import path_name

PARTS = ("vfm", "depth", "adapter", "head")


def parameter_counts(model_section, depth: int = 2) -> dict:
    """{'total', 'trainable', 'frozen', 'parts': {part: {'total', 'trainable'}}, 'modules':
    {path prefix: {'total', 'trainable'}}} of the model of `model_section`
    (`RunConfig.model`), from shapes only."""
    config = model_section.segmentor()
    abstract = nnx.eval_shape(lambda: Segmentor(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    parts = {part: {"total": 0, "trainable": 0} for part in PARTS}
    modules: dict[str, dict[str, int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        train = is_trainable(path)
        name = path_name(path).split("/")
        for entry in (parts.setdefault(name[0], {"total": 0, "trainable": 0}),
                      modules.setdefault("/".join(name[:depth]), {"total": 0, "trainable": 0})):
            entry["total"] += size
            entry["trainable"] += size * train
    total = sum(p["total"] for p in parts.values())
    trainable = sum(p["trainable"] for p in parts.values())
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "parts": parts, "modules": dict(sorted(modules.items()))}


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_table(counts: dict) -> str:
    rows = [("module", "parameters", "trainable", "")]
    rows += [(name, f"{c['total']:,}", f"{c['trainable']:,}", "")
             for name, c in counts["modules"].items()]
    rule = len(rows)
    rows += [(f"{name} (part)", f"{c['total']:,}", f"{c['trainable']:,}", _millions(c["total"]))
             for name, c in counts["parts"].items()]
    rows.append(("TOTAL", f"{counts['total']:,}", f"{counts['trainable']:,}",
                 _millions(counts["total"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  "
             f"{r[3]:>{widths[3]}}".rstrip() for r in rows]
    ruler = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], ruler, *lines[1:rule], ruler, *lines[rule:-1], ruler, lines[-1]])


def write_summary(model_section, workdir: str) -> dict:
    counts = parameter_counts(model_section)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(counts, f, indent=2)
    print(format_table(counts))
    return counts
