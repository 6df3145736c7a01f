"""Every field of a run's config with its value and a one-line doc: `--mode config`.

The docs are the fields' own comments in the dataclasses that define them (`TrainConfig`,
`ViTConfig`, `AdapterConfig`, ...: the trailing comment, else the first sentence of the comment
block above the field), and for `config.data` the tables of `data/spec.py`; nothing is written
twice. A field left None ("decided by the run") shows what the run decided, where the config
alone decides it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from typing import Any

from spectralmoe_jax.data import spec
from spectralmoe_jax.models.mask2former import Mask2FormerConfig
from spectralmoe_jax.models.spectral_moe import AdapterConfig
from spectralmoe_jax.models.vit import ViTConfig
from spectralmoe_jax.run_config import (BackboneSection, CompareConfig, EvalConfig, ExportConfig,
                                        LossConfig, MeshConfig, ModelSection, PredictConfig,
                                        RunConfig, TrainConfig, WeightsConfig)


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: doc} from the comments in the source of the dataclass `cls`."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    docs = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and n in code_lines]
        if trailing:
            docs[node.target.id] = " ".join(trailing)
            continue
        block, n = [], node.lineno - 1
        while n in comments and n not in code_lines and lines[n - 1].strip().startswith("#"):
            block.insert(0, comments[n])
            n -= 1
        if block:
            docs[node.target.id] = _first_sentence(" ".join(block))
    return docs


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


# What documents the keys of each section of the ConfigDict: a dataclass (its comments) or a
# table. 'data.splits.*' stands for every split.
TOP_LEVEL = {"seed": "random seed: initialisation, data order, augmentation, routing noise",
             "distributed": "call jax.distributed.initialize() first (multi-host runs)"}
SECTIONS: dict[str, Any] = {
    "": TOP_LEVEL,
    "data": spec.FIELDS,
    "data.layout": spec.LAYOUT_FIELDS,
    "data.splits.*": spec.SPLIT_FIELDS,
    "data.augment": spec.AugmentSpec,
    "data.augment.photometric": spec.PhotometricSpec,
    "model": ModelSection,
    "model.vfm": (WeightsConfig, BackboneSection),
    "model.depth": (WeightsConfig, BackboneSection),
    "model.vfm.overrides": ViTConfig,
    "model.depth.overrides": ViTConfig,
    "model.adapter": (AdapterConfig, {"enabled": "False: no adapter (the frozen-backbone "
                                                 "baseline)"}),
    "model.decoder": Mask2FormerConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "predict": PredictConfig,
    "export": ExportConfig,
    "mesh": MeshConfig,
    "compare": CompareConfig,
}


def _docs(source) -> dict[str, str]:
    if isinstance(source, tuple):
        return {k: v for part in reversed(source) for k, v in _docs(part).items()}
    return dict(source) if isinstance(source, dict) else field_docs(source)


def _section_of(path: str) -> str | None:
    """The SECTIONS key documenting the children of `path`, or None (a leaf)."""
    parts = path.split(".") if path else []
    if parts[:2] == ["data", "splits"] and len(parts) == 3:
        return "data.splits.*"
    if path == "data.splits":
        return path
    return path if path in SECTIONS else None


def fields(config) -> list[tuple[str, Any, str | None]]:
    """(dotted path, value, doc or None) of every leaf of the ConfigDict `config`."""
    out = []

    def walk(node, path):
        section = _section_of(path)
        docs = _docs(SECTIONS[section]) if section in SECTIONS else {}
        for key in node.keys():
            child = f"{path}.{key}" if path else str(key)
            value = node[key]
            if hasattr(value, "keys") and _section_of(child) is not None:
                walk(value, child)
            else:
                out.append((child, _plain(value), docs.get(str(key))))

    walk(config, "")
    return out


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def resolved_values(run: RunConfig) -> dict[str, Any]:
    """What the run decides for fields the config leaves None (before any checkpoint is read)."""
    model = run.model.segmentor()
    out: dict[str, Any] = {"data.num_classes": run.data.num_classes,
                           "data.band_names": run.data.band_names,
                           "model.feature_layers": model.feature_layers,
                           "model.wavelengths": model.wavelengths,
                           "model.depth.bands": model.depth_bands}
    for prefix, section in (("model.vfm.overrides", model.vfm),
                            ("model.depth.overrides", model.depth),
                            ("model.adapter", model.adapter), ("model.decoder", model.decoder)):
        if section is not None:
            out.update({f"{prefix}.{f.name}": getattr(section, f.name)
                        for f in dataclasses.fields(section)})
    return out


def describe(config, run: RunConfig | None = None) -> str:
    """The config, one field a line: `path = value  # doc`, with `-> resolved` after a None
    the run decides."""
    resolved = resolved_values(run) if run is not None else {}
    lines = ["# every field; set one with --config.FIELD=VALUE (tuples as '(a, b)')"]
    if run is not None:
        lines.append("# 'None -> x': left to the run, which takes x; a None left: decided by a "
                     "checkpoint's origin (or the default)")
    for path, value, doc in fields(config):
        text = f"{path} = {value!r}"
        if value is None and resolved.get(path) is not None:
            text += f" -> {_short(resolved[path])}"
        lines.append(f"{text}  # {doc or '(undocumented)'}")
    return "\n".join(lines)


def _short(value) -> str:
    if hasattr(value, "name") and not isinstance(value, str):  # a numpy dtype
        return str(value.name)
    return repr(value)
