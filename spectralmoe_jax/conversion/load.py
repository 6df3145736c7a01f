"""Weights from any file a user brings, as {our parameter path: array}: the one loading path.

A part of the segmentor comes from one of
  - a PyTorch file (.pth / .pt / .ckpt / .bin / .safetensors) in any naming scheme we convert:
    a foundation model for `vfm` / `depth` (conversion/vit.py), a released SpectralMoE or REIN
    MMSegmentation checkpoint for the trained parts (conversion/segmentor.py);
  - a folder written by `--mode convert` (Orbax, with `conversion.json` saying what it holds);
  - a training run: its workdir, its `checkpoints/` folder or one step folder in it (the
    `trained` item of the best step, else the latest).

Opening a file is separate from converting it: what a checkpoint implies about the model (its
naming scheme's position interpolation, the released adapter's math) is known from its keys
before the model is built, and the conversion then follows the model's final config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from spectralmoe_jax.conversion import vit as vit_conversion
from spectralmoe_jax.conversion.rules import ConversionError, flatten_state
from spectralmoe_jax.conversion.torch_io import load_state_dict

META_FILE = "conversion.json"  # beside a converted Orbax folder's contents


@dataclasses.dataclass
class Opened:
    """A checkpoint read from disk, not yet converted to a model's parameters."""
    path: str
    kind: str  # 'torch' (a PyTorch state dict), 'orbax' (converted folder), 'run' (a run's step)
    state: dict[str, np.ndarray]  # the file's arrays: PyTorch keys, or our paths
    scheme: str = ""  # the PyTorch naming scheme ('' for our own folders)
    implied: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields it implies
    step: int | None = None  # the training step, for a run's checkpoint
    holds: str = ""  # a converted folder: 'vfm', 'depth' or 'trained'


def _read_orbax(directory: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(directory))
    return {key: np.asarray(value) for key, value in flatten_state(restored).items()}


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_converted(directory: str, params: dict[str, np.ndarray], meta: dict) -> None:
    """A converted folder: the arrays under our paths (Orbax) and what they are (JSON)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    tree: dict = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.asarray(value)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, tree, force=True)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _run_step_folder(path: str) -> tuple[str, int | None] | None:
    """(checkpoints folder, step) when `path` is a run's workdir, its checkpoints folder or a
    step folder in it; else None."""
    from spectralmoe_jax.io.checkpoint import Checkpointer

    path = os.path.abspath(path)
    candidates = [(os.path.join(path, "checkpoints"), None), (path, None)]
    parent, name = os.path.split(path)
    if name.isdigit():
        candidates.append((parent, int(name)))
    for directory, step in candidates:
        if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
            continue
        checkpointer = Checkpointer(directory, read_only=True)
        try:
            if step is None:
                step = checkpointer.best_step() or checkpointer.latest_step()
            if step is not None:
                return directory, step
        finally:
            checkpointer.close()
    return None


def open_checkpoint(path: str, *, scheme: str = "auto", prefix: str = "") -> Opened:
    """Reads `path` (file, converted folder or run) without converting it."""
    if not path:
        raise ConversionError("no checkpoint path given")
    if os.path.isdir(path):
        run = _run_step_folder(path)
        if run is not None:
            return _open_run(*run)
        if not os.path.isfile(os.path.join(path, META_FILE)) and not os.path.isfile(
                os.path.join(path, "_CHECKPOINT_METADATA")):
            raise ConversionError(f"{path}: neither a converted folder (--mode convert) nor a "
                                  f"training run's checkpoints")
        meta = read_meta(path)
        return Opened(path, "orbax", _read_orbax(path), implied=dict(meta.get("implied", {})),
                      holds=meta.get("holds", ""))
    from spectralmoe_jax.conversion import adapter

    state = vit_conversion.select_prefix(load_state_dict(path), prefix, path)
    # Released DepthMoE weights imply the released adapter math (a backbone file implies
    # nothing here; its settings come from `backbone_implied`).
    return Opened(path, "torch", state, scheme=scheme, implied=adapter.implied_settings(state))


def _open_run(directory: str, step: int) -> Opened:
    """The `trained` item of a run's step: parameters and statistics under our paths."""
    from spectralmoe_jax.io.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, read_only=True)
    try:
        trained = checkpointer.restore(step)["trained"]
    finally:
        checkpointer.close()
    state = {key: np.asarray(value) for part in ("params", "stats")
             for key, value in flatten_state(trained[part]).items()}
    return Opened(os.path.join(directory, str(step)), "run", state, step=step)


def backbone_implied(opened: Opened, config) -> dict[str, Any]:
    """The ViTConfig fields the checkpoint's origin implies that `config` (the preset with the
    fields set in the run's config) leaves unset (None), logged once; the naming scheme of a
    PyTorch file is settled here."""
    implied = dict(opened.implied)
    if opened.kind == "torch":
        opened.scheme = vit_conversion.checkpoint_scheme(opened.state, opened.scheme)
        implied = vit_conversion.implied_settings(opened.scheme, config)
    resolved = vit_conversion.apply_implied_settings(
        config, implied, origin=f"{opened.path} ({opened.scheme or 'converted'} weights)")
    return {name: getattr(resolved, name) for name in implied if getattr(config, name) is None}


def backbone_params(opened: Opened, config, *, stem: str = "cyclic") -> dict[str, np.ndarray]:
    """A backbone's parameters for the ViT `config`, with the released conversion options:
    patch kernel and position table resized to the configured patch and grid, multispectral stem
    by `stem`."""
    if opened.kind != "torch":
        return opened.state
    return vit_conversion.convert_state_dict(
        opened.state, config, opened.scheme, resize_patch=True, resize_pos=True, stem=stem)


def trained_params(opened: Opened, model) -> dict[str, np.ndarray]:
    """The trained variables (everything outside the frozen backbones: 'adapter/...',
    'head/...', a neck's) for `model`: those the checkpoint holds (a released adapter alone, a
    head alone, or both)."""
    if opened.kind != "torch":
        return opened.state
    from spectralmoe_jax.conversion.segmentor import convert_trained_parts

    return convert_trained_parts(opened.state, model)
