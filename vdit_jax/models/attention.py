"""One attention entry point for every backend: kernels, padding to their block multiples, sequence parallelism.

    from vdit_jax.models import attention
    out = attention.attend(q, k, v, implementation="auto")   # q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]

Implementations (`DiTConfig.attention_impl`):
  auto    cudnn on NVIDIA GPUs for bf16/fp16 inputs, splash on TPU, xla elsewhere.
  xla     `jax.nn.dot_product_attention(implementation="xla")`: materialises the [Lq, Lk] scores.
  cudnn   cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) in bf16; the token axes
          are padded to a multiple of 64 and the padding masked through the sequence lengths, the head width padded
          to a multiple of 8 (wider than cuDNN takes: XLA, with one log line).
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): the token axes are padded
          to the kernel's block (128, or 512 for long sequences) and padded keys masked with segment ids; the head
          width is padded to a multiple of 128 lanes (zeros change no score). `interpret=True` runs the kernel on
          the CPU (tests).
Any frame count and resolution works with every implementation: a token count that is not a block multiple is
padded, never an error.

Key masks (`kv_mask` bool [B, Lk], True = a real key; the text mask of cross-attention) work with every
implementation: xla passes them as a boolean mask; cudnn moves each example's real keys to the front (attention is
invariant to the order of its keys: there is no positional bias) and masks the rest through the key lengths, so any
mask runs on the flash kernel; splash turns them into per-example key segment ids; ring attention passes each
mask block around with its K/V block. A query whose keys are all masked gets zeros (never NaN).

Under a mesh (`jax.set_mesh`) with the logical rules in context, kernels (which XLA cannot partition) run per
shard inside `jax.shard_map` with batch / heads / tokens split as the rules say. When the query tokens are split
over the `sequence` axis (self-attention of the `full` layout), each shard needs every key: `allgather` gathers
K and V over the axis (then any kernel runs locally), `ring` passes K/V blocks around the ring with `ppermute`
and merges the partial results with their log-sum-exp (online softmax), so no shard ever holds all keys.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SEQUENCE_PARALLEL = ("allgather", "ring")
CUDNN_BLOCK = 64
CUDNN_HEAD_MULTIPLE = 8  # cuDNN flash attention takes head widths that are multiples of 8 (and at most 128 / 256)
SPLASH_LANES = 128
_MASKED_LOGIT = -1e30  # a masked key's logit in float32 ring attention: finite, so no inf - inf


def resolve(implementation: str, dtype, platform: str | None = None) -> str:
    """The concrete implementation for `implementation` on `platform` (default: JAX's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    platform = platform or jax.default_backend()
    if implementation == "cudnn" and platform != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU, not {platform!r}; use 'auto' or 'xla'")
    if implementation != "auto":
        return implementation
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


# ----------------------------------------------------------------------------------------------------
# Single-shard kernels: [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block: int = 1, kv_mask: jax.Array | None = None
) -> jax.Array:
    """XLA attention; with `block` > 1 the token axes are padded to that multiple and the padding masked (the
    kernels' path, kept here so it is tested on every backend). `kv_mask` bool [B, Lk]: False keys get no weight
    (each row needs at least one True; `attend` sees to that)."""
    lq, lk = q.shape[1], k.shape[1]
    if block <= 1:
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    q, k, v = _pad_axis(q, 1, block), _pad_axis(k, 1, block), _pad_axis(v, 1, block)
    kv_len = jnp.full((q.shape[0],), lk, jnp.int32)
    mask = None if kv_mask is None else _pad_axis(kv_mask, 1, block)[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_len, implementation="xla")
    return out[:, :lq]


def compact_keys(k: jax.Array, v: jax.Array, kv_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each example's real keys (and values) moved to the front, in order: (k, v, lengths int32 [B]).

    Attention has no positional bias between queries and keys, so the reordered keys give the same result when
    masked by length, which is the only key mask cuDNN's flash kernel takes.
    """
    order = jnp.argsort(~kv_mask, axis=1, stable=True)[:, :, None, None]  # [B, Lk, 1, 1]: real keys first
    take = lambda a: jnp.take_along_axis(a, order, axis=1)
    return take(k), take(v), jnp.sum(kv_mask, axis=1, dtype=jnp.int32)


def cudnn_max_head_dim(device=None) -> int:
    """The widest head cuDNN flash attention takes: 256 on Hopper (compute capability 9) and newer, else 128."""
    device = device or jax.devices()[0]
    try:
        major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    except ValueError:
        major = 0
    return 256 if major >= 9 else 128


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None = None, *, implementation: str = "cudnn"
) -> jax.Array:
    """cuDNN flash attention in bf16 (f32 inputs are cast): token axes padded to 64 and masked by length (a key mask
    becomes a length after `compact_keys`), the head width padded with zeros to a multiple of 8 (cuDNN's constraint;
    zeros change no score, and the softmax keeps the scale 1/sqrt(true width)). A head wider than cuDNN takes
    (`cudnn_max_head_dim`) runs plain XLA attention instead, with one log line.

    `implementation="xla"` runs this same padded, masked call through XLA (how the CPU tests check the path).
    """
    dtype, lq, b, d = q.dtype, q.shape[1], q.shape[0], q.shape[-1]
    padded_d = -(-d // CUDNN_HEAD_MULTIPLE) * CUDNN_HEAD_MULTIPLE
    if implementation == "cudnn" and padded_d > cudnn_max_head_dim():
        logging.log_first_n(
            logging.WARNING,
            "attention heads of width %d are wider than cuDNN flash attention takes (%d): using XLA attention",
            1,
            d,
            cudnn_max_head_dim(),
        )
        return xla_attention(q, k, v, kv_mask=kv_mask)
    kv_len = jnp.full((b,), k.shape[1], jnp.int32)
    if kv_mask is not None:
        k, v, kv_len = compact_keys(k, v, kv_mask)
    cast = lambda a: a if a.dtype in (jnp.bfloat16, jnp.float16) else a.astype(jnp.bfloat16)
    q, k, v = (_pad_axis(_pad_axis(cast(a), 1, CUDNN_BLOCK), 3, CUDNN_HEAD_MULTIPLE) for a in (q, k, v))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=1.0 / math.sqrt(d),
        query_seq_lengths=jnp.full((b,), lq, jnp.int32),
        key_value_seq_lengths=kv_len,
        implementation=implementation,
    )
    return out[:, :lq, :, :d].astype(dtype)


def splash_block(length: int) -> int:
    """The splash tile along a token axis: 512 for long sequences (TPU's sweet spot), else 128."""
    return 512 if length >= 2048 else 128


def _splash_kernel(heads: int, lq: int, lk: int, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    blocks = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sm.MultiHeadMask([sm.FullMask((lq, lk))] * heads)
    # Built inside each trace, not cached: the kernel holds its mask tables as arrays staged into the caller's
    # trace, so a kernel kept across traces would leak the first one's tracers.
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False, kv_mask: jax.Array | None = None
) -> jax.Array:
    """Pallas splash attention with padded token axes and head width; padded keys, and keys that `kv_mask`
    [B, Lk] marks False, are masked by per-example segment ids (a query sees only keys of its segment, 0)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    dtype, (b, lq, h, d), lk = q.dtype, q.shape, k.shape[1]
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # splash does not scale the logits
    bq, bkv = splash_block(lq), splash_block(lk)
    q = _pad_axis(_pad_axis(q, 1, bq), 3, SPLASH_LANES)
    k = _pad_axis(_pad_axis(k, 1, bkv), 3, SPLASH_LANES)
    v = _pad_axis(_pad_axis(v, 1, bkv), 3, SPLASH_LANES)
    kernel = _splash_kernel(h, q.shape[1], k.shape[1], bq, bkv, bool(interpret))
    real = jnp.broadcast_to(jnp.arange(k.shape[1]) < lk, (b, k.shape[1]))  # [B, Lk padded]
    if kv_mask is not None:
        real = real & _pad_axis(kv_mask.astype(bool), 1, bkv)
    segments = sk.SegmentIds(q=jnp.zeros((b, q.shape[1]), jnp.int32), kv=(~real).astype(jnp.int32))
    heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # [B, H, L, D]: the kernel's layout, one example at a time
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v), segments)
    return heads_major(out)[:, :lq, :, :d].astype(dtype)


def local_attention(q, k, v, *, implementation: str, interpret: bool = False, kv_mask=None) -> jax.Array:
    """Attention of one shard with a concrete implementation (`resolve` first); `kv_mask` bool [B, Lk] or None."""
    if implementation == "xla":
        return xla_attention(q, k, v, kv_mask=kv_mask)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, kv_mask)
    if implementation == "splash":
        return splash_attention(q, k, v, interpret=interpret, kv_mask=kv_mask)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS[1:]}")


# ----------------------------------------------------------------------------------------------------
# Sequence parallelism (inside shard_map, tokens split over `axis`).


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis, kv_mask: jax.Array | None = None) -> jax.Array:
    """Exact attention of the local queries to the keys of every shard of `axis`, passing K/V around the ring.

    Step s attends to the K/V block of shard (i - s) mod P, then hands its block (and its `kv_mask` block, bool
    [B, Lk/P]) to the next shard with `ppermute`; partial outputs are merged with their log-sum-exp, in float32.
    Blocks are plain einsums, so a shard holds [Lq/P, Lk/P] scores at a time. The block log-sum-exp is
    differentiated through (the residual of `jax.nn.dot_product_attention` is a stop-gradient, so it cannot be used
    here). Masked keys get a large negative finite logit, so a block with no real key adds nothing (and no NaN).
    """
    size = jax.lax.axis_size(axis)
    perm = [(j, (j + 1) % size) for j in range(size)]
    b, lq, h, _ = q.shape
    if kv_mask is None:
        kv_mask = jnp.ones(k.shape[:2], bool)

    scale = 1.0 / np.sqrt(q.shape[-1])
    qf = q.astype(jnp.float32) * scale

    def step(carry, _):
        out, lse, k, v, mask = carry
        logits = jnp.einsum("bqhd,bkhd->bqhk", qf, k.astype(jnp.float32))
        logits = jnp.where(mask[:, None, None, :], logits, _MASKED_LOGIT)
        lse_blk = jax.nn.logsumexp(logits, axis=-1)  # [B, Lq, H]
        o_blk = jnp.einsum("bqhk,bkhd->bqhd", jnp.exp(logits - lse_blk[..., None]), v.astype(jnp.float32))
        new = jnp.logaddexp(lse, lse_blk)
        out = out * jnp.exp(lse - new)[..., None] + o_blk * jnp.exp(lse_blk - new)[..., None]
        k, v, mask = (jax.lax.ppermute(a, axis, perm) for a in (k, v, mask))
        return (out, new, k, v, mask), None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, lq, h), -jnp.inf, jnp.float32), k, v, kv_mask)
    (out, _, _, _, _), _ = jax.lax.scan(step, init, None, length=size)
    return out.astype(q.dtype)


def _mesh_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh) -> P:
    """The PartitionSpec the logical rules give an array, keeping only mesh axes > 1 that divide its dims."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes))
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        names = tuple(a for a in names if mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(None if not names or dim % ways else (names if len(names) > 1 else names[0]))
    return P(*out)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    implementation: str = "auto",
    sequence_parallel: str = "allgather",
    q_axes: Sequence[str | None] | None = None,
    kv_axes: Sequence[str | None] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Multi-head attention q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (softmax scale 1/sqrt(D)).

    `kv_mask` bool [B, Lk] (True = a real key; None = all real): masked keys get no attention; an example with no
    real key gets zeros. `q_axes` / `kv_axes` are the logical axis names of q and k/v (for their shardings under a
    mesh); with no mesh in context, or XLA attention whose tokens are not split, this is plain single-program
    attention that XLA's partitioner splits by itself.
    """
    if sequence_parallel not in SEQUENCE_PARALLEL:
        raise ValueError(f"sequence_parallel {sequence_parallel!r} is not one of {SEQUENCE_PARALLEL}")
    impl = resolve(implementation, q.dtype)
    if kv_mask is None:
        return _attend(q, k, v, None, impl, sequence_parallel, q_axes, kv_axes, interpret)
    if kv_mask.shape != k.shape[:2]:
        raise ValueError(f"kv_mask must be [B, Lk] = {tuple(k.shape[:2])}, got {tuple(kv_mask.shape)}")
    # An example with no real key attends to all of them (finite everywhere, gradients included), then gets zeros.
    has_key = jnp.any(kv_mask, axis=1)  # [B]
    kv_mask = kv_mask.astype(bool) | ~has_key[:, None]
    out = _attend(q, k, v, kv_mask, impl, sequence_parallel, q_axes, kv_axes, interpret)
    return jnp.where(has_key[:, None, None, None], out, jnp.zeros((), out.dtype))


def _attend(q, k, v, kv_mask, impl, sequence_parallel, q_axes, kv_axes, interpret) -> jax.Array:
    local = functools.partial(local_attention, implementation=impl, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or q_axes is None or math.prod(mesh.shape.values()) == 1:
        return local(q, k, v, kv_mask=kv_mask)
    q_spec = _mesh_spec(q.shape, q_axes, mesh)
    kv_spec = _mesh_spec(k.shape, kv_axes or q_axes, mesh)
    seq = q_spec[1]
    split_keys = seq is not None and kv_spec[1] == seq  # self-attention with its tokens split
    if impl == "xla" and not split_keys:
        return local(q, k, v, kv_mask=kv_mask)

    def shard(q, k, v, kv_mask):
        if split_keys:
            if sequence_parallel == "ring":
                return ring_attention(q, k, v, seq, kv_mask)
            gather = lambda a: jax.lax.all_gather(a, seq, axis=1, tiled=True)
            k, v = gather(k), gather(v)
            kv_mask = None if kv_mask is None else gather(kv_mask)
        return local(q, k, v, kv_mask=kv_mask)

    mask_spec = None if kv_mask is None else P(*kv_spec[:2])
    return jax.shard_map(shard, in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, kv_mask
    )
