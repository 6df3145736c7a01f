"""Reading PyTorch checkpoint files into {key: numpy array} without building any torch model.

Handles the released formats: `.pth` / `.pt` / `.ckpt` / `.bin` (torch pickles, possibly wrapped
in "state_dict", "model" or "module"), and `.safetensors`. torch is imported only here, and only
for pickled files. `.onnx` exports are read by `onnx_io`, which names their weights as PyTorch did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from spectralmoe_jax.errors import UserError

_WRAPPERS = ("state_dict", "model", "module", "teacher")


class CheckpointReadError(UserError, IOError):
    """A checkpoint file that cannot be read: names the file and the reason."""


def _to_numpy(value) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap(checkpoint: Mapping) -> Mapping:
    """Finds the state dict inside the usual training-checkpoint wrappers."""
    while True:
        for wrapper in _WRAPPERS:
            inner = checkpoint.get(wrapper) if isinstance(checkpoint, Mapping) else None
            if isinstance(inner, Mapping) and inner:
                checkpoint = inner
                break
        else:
            return checkpoint


def load_state_dict(path: str | os.PathLike, *, strip_prefix: str = "") -> dict[str, np.ndarray]:
    """Loads a PyTorch checkpoint file as {key: numpy array}.

    `strip_prefix` removes a leading prefix from every key that has it (e.g. "module." or
    "pretrained.").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint file not found: {path}")
    if path.endswith(".onnx"):
        from spectralmoe_jax.conversion.onnx_io import onnx_state_dict

        raw = onnx_state_dict(path)
        return {key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key:
                value for key, value in raw.items()}
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                raw = load_file(path)
            except (TypeError, ValueError):  # bf16 tensors: go through torch
                from safetensors.torch import load_file as load_torch

                raw = load_torch(path)
        else:
            import torch

            raw = torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointReadError:
        raise
    except Exception as error:  # noqa: BLE001 - report any reader failure with the file name
        raise CheckpointReadError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(raw, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(raw).__name__}, not a state dict")
    state = unwrap(raw)
    out = {}
    for key, value in state.items():
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        try:
            out[key] = _to_numpy(value)
        except Exception:  # noqa: BLE001 - non-tensor entries (e.g. config objects) are skipped
            continue
    return out
