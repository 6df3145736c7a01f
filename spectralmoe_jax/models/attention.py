"""One attention function for every ViT: XLA, or a flash attention kernel on padded tokens.

cuDNN's fused kernel rejects sequence lengths such as 1029 (cls + 4 storage + 32x32 patches,
SPEC section 4), so the 'cudnn' path pads the sequence to a multiple of 128 and passes the true
lengths (`query_seq_lengths`, `key_value_seq_lengths`): padded keys get no weight and padded query
rows are cut off, so the padding never changes a result.

'pallas' is the alternative issue 7 asks to measure against cuDNN: jax's own Pallas (Triton)
flash attention, `jax.experimental.pallas.ops.gpu.attention.mha`, forward and backward kernels,
on the same padded tokens with segment ids standing in for the true lengths (padding is segment
0, tokens segment 1). Lowered for anything but a GPU it runs in Pallas' interpreter, slowly: for
tests only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_implementation(implementation: str | None, dtype) -> str:
    """Maps None / 'xla' / 'cudnn' / 'auto' to the kernel that will run."""
    if implementation in (None, "xla"):
        return "xla"
    if implementation in ("cudnn", "pallas"):
        return implementation
    if implementation == "auto":
        # cuDNN flash attention exists only for half precision on GPU.
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and jnp.dtype(dtype) in _CUDNN_DTYPES else "xla"
    raise ValueError(f"unknown attention implementation {implementation!r}: "
                     "expected None, 'xla', 'cudnn', 'pallas' or 'auto'")


def _pad_axis(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _pad_last_two(x, q_len: int, kv_len: int, q_pad: int, kv_pad: int):
    """Pads a bias or mask [..., T, S] to [..., T', S'] where its axes are full length."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape[-2] == q_len:
        x = _pad_axis(x, x.ndim - 2, q_pad)
    if x.shape[-1] == kv_len:
        x = _pad_axis(x, x.ndim - 1, kv_pad)
    return x


def dot_product_attention(q, k, v, *, bias=None, mask=None, implementation: str | None = None,
                          pad_multiple: int | None = None):
    """Scaled dot-product attention through `jax.nn.dot_product_attention`.

    Args:
      q: [B, T, H, Dh] queries; k, v: [B, S, H, Dh].
      bias, mask: optional, broadcastable to [B, H, T, S].
      implementation: None or 'xla' (XLA), 'cudnn' (flash attention on padded tokens), 'pallas'
        (Pallas flash attention on padded tokens; no bias or mask), 'auto' (cudnn on GPU for
        bf16/fp16 inputs, XLA otherwise).
      pad_multiple: pad T and S up to this multiple and pass the true lengths. Defaults to 128
        for cuDNN and Pallas and to no padding for XLA (set it to exercise the padded path
        anywhere).

    Returns:
      [B, T, H, Dh] in the dtype of q.
    """
    implementation = resolve_implementation(implementation, q.dtype)
    if pad_multiple is None:
        pad_multiple = 0 if implementation == "xla" else 128
    if implementation == "pallas":
        return _pallas_attention(q, k, v, bias=bias, mask=mask, pad_multiple=pad_multiple)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if not pad_multiple:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                            implementation=implementation)
    q_pad = -(-q_len // pad_multiple) * pad_multiple
    kv_pad = -(-kv_len // pad_multiple) * pad_multiple
    out = jax.nn.dot_product_attention(
        _pad_axis(q, 1, q_pad), _pad_axis(k, 1, kv_pad), _pad_axis(v, 1, kv_pad),
        bias=_pad_last_two(bias, q_len, kv_len, q_pad, kv_pad),
        mask=_pad_last_two(mask, q_len, kv_len, q_pad, kv_pad),
        query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32),
        implementation=implementation,
    )
    return out[:, :q_len]


def _pallas_attention(q, k, v, *, bias, mask, pad_multiple: int):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    if bias is not None or mask is not None:
        raise ValueError("implementation='pallas' takes no bias or mask (ViT self-attention only)")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"implementation='pallas' needs self-attention, got {q.shape[1]} query "
                         f"and {k.shape[1]} key tokens")
    length = q.shape[1]
    padded = -(-length // pad_multiple) * pad_multiple
    # Every tile (forward and backward kernels) at most 128 and dividing the padded length.
    block = min(pad_multiple, 128)
    sizes = pallas_attention.BlockSizes.get_default()
    sizes = dataclasses.replace(sizes, **{field.name: block for field in dataclasses.fields(sizes)
                                          if field.name.startswith("block_")})
    segment_ids = jnp.broadcast_to(jnp.arange(padded) < length, (q.shape[0], padded))

    def kernel(interpret: bool):
        return lambda q, k, v, segment_ids: pallas_attention.mha(
            q, k, v, segment_ids=segment_ids, sm_scale=q.shape[-1] ** -0.5,
            block_sizes=sizes, interpret=interpret)

    # The GPU kernel where the program is lowered for a GPU (also ahead of time, from a machine
    # without one: scripts/aot_check.py), Pallas' interpreter elsewhere.
    out = jax.lax.platform_dependent(
        *(_pad_axis(x, 1, padded) for x in (q, k, v)), segment_ids.astype(jnp.int32),
        cuda=kernel(False), rocm=kernel(False), default=kernel(True))
    return out[:, :length]
