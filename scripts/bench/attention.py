"""The VFM's self-attention alone, [B, T, heads, head_dim] in the compute dtype, forward and
forward + backward, once per kernel (`--attention-impls`): issue 7 asks for the fastest.

Besides the model's implementations (xla, cudnn, pallas: models/attention.py) the part compares
TPU's Pallas splash attention, which only this benchmark runs ('splash': head_dim as it is,
'splash128': head_dim zero-padded to 128, the multiple TPU kernels are tiled for; ViT-L's is 64),
on tokens padded to a multiple of 128 with segment ids keeping the padding out of every result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bench.program import Context, Program
from spectralmoe_jax.models.attention import dot_product_attention

SPLASH = ("splash", "splash128")


def splash_attention(q, k, v, *, head_dim_multiple: int = 1, pad_multiple: int = 128):
    """[B, T, H, Dh] self-attention by the TPU splash kernel on padded tokens (and head_dim).

    XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically
    partitioned"): under a mesh with a 'data' axis (aot_check.py sets its mesh) each device
    runs the kernel on its own slice of the batch, in a shard_map.
    """
    def local(q, k, v):
        return _splash_local(q, k, v, head_dim_multiple=head_dim_multiple,
                             pad_multiple=pad_multiple)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("data", 1) == 1:
        return local(q, k, v)
    batch = PartitionSpec("data")
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch,
                         check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, head_dim_multiple: int, pad_multiple: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, length, heads, head_dim = q.shape
    padded = -(-length // pad_multiple) * pad_multiple
    width = -(-head_dim // head_dim_multiple) * head_dim_multiple
    scale = head_dim ** -0.5  # the true head_dim's: zero columns change no dot product

    def layout(x, factor=1.0):  # [B, T, H, Dh] -> [B, H, T', Dh'] zero-padded
        x = jnp.pad(x * jnp.asarray(factor, x.dtype),
                    ((0, 0), (0, padded - length), (0, 0), (0, width - head_dim)))
        return x.transpose(0, 2, 1, 3)

    mask = sm.MultiHeadMask([sm.FullMask((padded, padded)) for _ in range(heads)])
    ids = (jnp.arange(padded) < length).astype(jnp.int32)
    segments = sk.SegmentIds(q=ids, kv=ids)

    def run(interpret: bool):  # the kernel when lowered for a TPU (ahead of time too)
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))

    out = jax.lax.platform_dependent(layout(q, scale), layout(k), layout(v), tpu=run(False),
                                     default=run(True))
    return out.transpose(0, 2, 1, 3)[:, :length, :, :head_dim]


def attention_fn(implementation: str):
    if implementation == "splash":
        return lambda q, k, v: splash_attention(q, k, v)
    if implementation == "splash128":
        return lambda q, k, v: splash_attention(q, k, v, head_dim_multiple=128)
    return lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation)


def programs(ctx: Context):
    c = ctx.model.vfm.config
    tokens = (ctx.size // c.patch_size) ** 2 + 1 + c.num_register_tokens
    shape = (ctx.batch, tokens, c.num_heads, c.width // c.num_heads)
    q, k, v, cotangent = (ctx.array(jax.random.key(i), shape, c.dtype) for i in range(4))
    forward_flops = 4.0 * math.prod(shape) * tokens  # q k^T and p v
    for implementation in ctx.options.attention_impls:
        forward = attention_fn(implementation)

        def backward(q, k, v, cotangent, forward=forward):
            _, pullback = jax.vjp(forward, q, k, v)
            return pullback(cotangent)

        info = dict(shape=list(shape), implementation=implementation)
        yield Program(f"attention_{implementation}_forward", forward, (q, k, v),
                      layout=(0, 0, 0), flops_analytic=forward_flops, info=info)
        yield Program(f"attention_{implementation}_forward_backward", backward,
                      (q, k, v, cotangent), layout=(0, 0, 0, 0), flops_analytic=3 * forward_flops,
                      info=info)
