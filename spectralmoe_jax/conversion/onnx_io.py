"""Reading the weights of an ONNX file (a `torch.onnx` export) as a PyTorch-style state dict.

The exporter keeps the state-dict name of every parameter the graph uses as is (biases, norms,
the patch convolution, LayerScale) but folds the others into anonymous constants named
`onnx::<Op>_<n>`: a Linear weight becomes the transposed right operand of a `MatMul`, and a
parameter sliced before use becomes its slices. Such a constant is named here by the one node
that consumes it, whose name is the module scope of the export (`/backbone/encoder/layer.0/
attention/attention/key/MatMul`):
- the right operand of a MatMul -> `<scope>.weight`, transposed back to PyTorch's [out, in];
- anything else -> `<scope>.<node>`, e.g. `backbone.embeddings.Concat_6`, left for the naming
  scheme to put together (conversion/vit.py rejoins DINOv2's sliced position table).
Every anonymous constant must have exactly one named consumer, and no recovered name may
collide with a kept one: otherwise `ConversionError`, naming the constant.
"""

from __future__ import annotations

import os

import numpy as np

from spectralmoe_jax.conversion.rules import ConversionError
from spectralmoe_jax.conversion.torch_io import CheckpointReadError

ANONYMOUS = "onnx::"


def _scope(node_name: str) -> tuple[str, str]:
    """'/backbone/embeddings/Concat_6' -> ('backbone.embeddings', 'Concat_6')."""
    parts = [part for part in node_name.split("/") if part]
    return ".".join(parts[:-1]), (parts[-1] if parts else "")


def _recovered_name(name: str, array: np.ndarray, consumers: list) -> tuple[str, np.ndarray]:
    if len(consumers) != 1:
        described = ", ".join(f"{node.op_type} {node.name!r}" for node, _ in consumers) or "none"
        raise ConversionError(f"ONNX constant {name!r} {tuple(array.shape)} needs exactly one "
                              f"consuming node to be named by, found: {described}")
    node, position = consumers[0]
    scope, op_name = _scope(node.name)
    if not scope:
        raise ConversionError(f"ONNX constant {name!r} is consumed by {node.op_type} node "
                              f"{node.name!r}, whose name holds no module scope")
    if node.op_type == "MatMul" and position == 1 and array.ndim == 2:
        return f"{scope}.weight", np.ascontiguousarray(array.T)  # x @ W.T of nn.Linear
    return f"{scope}.{op_name}", array


def onnx_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The initializers of an ONNX file as {PyTorch-style name: float32 or integer array}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"ONNX file not found: {path}")
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise CheckpointReadError(f"reading {path} needs the onnx package "
                                  f"(pip install -e '.[demo]')") from error
    try:
        graph = onnx.load(path).graph
    except Exception as error:  # noqa: BLE001 - report any reader failure with the file name
        raise CheckpointReadError(f"cannot read ONNX file {path}: {error}") from error

    consumers: dict[str, list] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    kept, recovered = {}, {}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if not tensor.name.startswith(ANONYMOUS):
            kept[tensor.name] = array
            continue
        name, array = _recovered_name(tensor.name, array, consumers.get(tensor.name, []))
        recovered.setdefault(name, []).append((tensor.name, array))
    for name, sources in recovered.items():
        if len(sources) > 1 or name in kept:
            clashing = [source for source, _ in sources] + ([name] if name in kept else [])
            raise ConversionError(f"{path}: ONNX initializers {clashing} would all be named "
                                  f"{name!r}")
    return {**kept, **{name: sources[0][1] for name, sources in recovered.items()}}
