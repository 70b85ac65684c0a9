"""One attention entry point for every backend: kernels, padding to their block multiples, sequence parallelism.

    from vdit_jax.models import attention
    out = attention.attend(q, k, v, implementation="auto")   # q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]

Implementations (`DiTConfig.attention_impl`):
  auto    cudnn on NVIDIA GPUs for bf16/fp16 inputs, splash on TPU, chunked on CPUs from CHUNKED_MIN_KEYS keys on,
          xla elsewhere.
  xla     plain attention over all [Lq, Lk] scores at once (`xla_attention`: the math of
          `jax.nn.dot_product_attention(implementation="xla")`, heads-major, with a 2.2x faster gradient on CPUs).
  chunked `blockwise.query_chunked_attention`: CHUNK_Q queries of a few heads at a time against every key, with a
          custom VJP that recomputes each chunk's probabilities; no [Lq, Lk] scores in memory, forward or backward.
          On 2 CPU cores, 2,048 tokens of 6 heads x 64: forward 44 ms and gradient 127 ms against xla's 143 and
          530; at 512 tokens 7.9 / 21.7 against 7.4 / 35.0; at 64 tokens (16 x 4 heads x 32) within noise of xla
          (gradient 2.5-3.0 against 2.4-2.7 ms over two runs) (`python -m vdit_jax.bench --mode=attention_speed`).
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
and merges the partial results with their log-sum-exp (online softmax, `vdit_jax.models.blockwise`), so no shard
ever holds all keys. Ring attention is its own blockwise kernel (einsums per block, float32 accumulation, a
custom VJP that recomputes each block's scores): it runs the same for every `implementation`, and its memory per
device, backward included, is one [Lq/P, Lk/P] block of scores. Grouped layouts (spatial / temporal / window)
fold their groups into the batch axis, which the rules split over the data axes and `sequence` together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from vdit_jax.models import blockwise

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
CHUNK_Q = 512  # chunked: queries per chunk (C1's 2,048 tokens: 512 x 2 heads a chunk beat 128 x 12 and 256 x 2-4)
CHUNKED_MIN_KEYS = 256  # auto on a CPU: chunked from this many keys on (faster at 512, slower at 64: above)
SEQUENCE_PARALLEL = ("allgather", "ring")
CUDNN_BLOCK = 64
CUDNN_HEAD_MULTIPLE = 8  # cuDNN flash attention takes head widths that are multiples of 8 (and at most 128 / 256)
SPLASH_LANES = 128


def resolve(implementation: str, dtype, platform: str | None = None, kv_tokens: int | None = None) -> str:
    """The concrete implementation for `implementation` on `platform` (default: JAX's default backend) for
    attention over `kv_tokens` keys (None: many)."""
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
    if platform == "cpu" and (kv_tokens is None or kv_tokens >= CHUNKED_MIN_KEYS):
        return "chunked"
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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_mask: jax.Array | None = None) -> jax.Array:
    """Plain XLA attention, softmax(q k^T / sqrt(D)) v over all [B, H, Lq, Lk] scores at once. `kv_mask` bool
    [B, Lk]: False keys get no weight (each row needs at least one True; `attend` sees to that).

    The math of `jax.nn.dot_product_attention(implementation="xla")`, written heads-major with float32 logits and
    softmax: jax's version reshapes the heads into groups for GQA and its backward sums over that singleton group
    axis and transposes the scores, which made its gradient 2.2x slower on 2 CPU cores (C1's text
    cross-attention, 2,048 queries x 64 keys of 6 x 64: 29.6 against 13.5 ms; at the demo's 64 tokens, 3.4
    against 2.4 ms).
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :].astype(bool), logits, blockwise.MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


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
    if implementation == "chunked":
        return blockwise.query_chunked_attention(q, k, v, kv_mask, block_q=CHUNK_Q)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, kv_mask)
    if implementation == "splash":
        return splash_attention(q, k, v, interpret=interpret, kv_mask=kv_mask)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS[1:]}")


# ----------------------------------------------------------------------------------------------------
# Sequence parallelism (inside shard_map, tokens split over `axis`).


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis, kv_mask: jax.Array | None = None) -> jax.Array:
    """Exact attention of the local queries to the keys of every shard of `axis`, passing K/V around the ring.

    Step s folds the K/V block of shard (i - s) mod P (with its `kv_mask` block, bool [B, Lk/P]) into a running
    online-softmax result (`blockwise.update`, float32), then hands the block to the next shard with `ppermute`.
    The backward (a custom VJP) passes the blocks around the ring again, each carrying its dk / dv accumulator
    home, and recomputes one block's probabilities at a time from the saved log-sum-exp: forward and backward
    hold [Lq/P, Lk/P] scores and one K/V block at a time, never all keys. A query with no real key gets zeros.
    """
    if kv_mask is None:
        kv_mask = jnp.ones(k.shape[:2], bool)
    return _ring(q, k, v, kv_mask.astype(bool), axis)


def _ring_perm(axis) -> list[tuple[int, int]]:
    size = jax.lax.axis_size(axis)
    return [(j, (j + 1) % size) for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, kv_mask, axis):
    return _ring_fwd(q, k, v, kv_mask, axis)[0]


def _ring_fwd(q, k, v, kv_mask, axis):
    perm = _ring_perm(axis)

    def step(state, _):
        carry, blk = state
        carry = blockwise.update(carry, q, *blk)
        return (carry, tuple(jax.lax.ppermute(a, axis, perm) for a in blk)), None

    # P - 1 steps that pass the block on, then the last block (which need not travel further).
    (carry, blk), _ = jax.lax.scan(step, (blockwise.init(q), (k, v, kv_mask)), None, length=len(perm) - 1)
    carry = blockwise.update(carry, q, *blk)
    out = blockwise.finalize(carry, q.dtype)
    return out, (q, k, v, kv_mask, out, carry.lse)


def _ring_bwd(axis, res, dout):
    q, k, v, kv_mask, out, lse = res
    perm = _ring_perm(axis)
    dout, delta = blockwise.backward_inputs(out, lse, dout)

    def grads(dq, blk, dkv):
        dq_b, dk_b, dv_b = blockwise.block_grads(q, *blk, lse, dout, delta)
        return dq + dq_b, (dkv[0] + dk_b, dkv[1] + dv_b)

    def step(state, _):
        dq, blk, dkv = state
        dq, dkv = grads(dq, blk, dkv)
        blk, dkv = (tuple(jax.lax.ppermute(a, axis, perm) for a in t) for t in (blk, dkv))
        return (dq, blk, dkv), None

    zeros = jnp.zeros_like(k, jnp.float32)
    init = (jnp.zeros_like(q, jnp.float32), (k, v, kv_mask), (zeros, zeros))
    (dq, blk, dkv), _ = jax.lax.scan(step, init, None, length=len(perm) - 1)
    dq, dkv = grads(dq, blk, dkv)
    dk, dv = (jax.lax.ppermute(a, axis, perm) for a in dkv)  # the last step's accumulators go home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _mesh_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh) -> P:
    """The PartitionSpec the logical rules give an array (shard_map needs whole shards): of the mesh axes > 1 a
    dimension is mapped to, the longest prefix whose product divides it (batch x groups over data, fsdp and
    sequence: 4 x 3 groups on data 2 x sequence 4 is split over data alone)."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes))
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept, ways = [], 1
        for a in (a for a in names if mesh.shape[a] > 1):
            if dim % (ways * mesh.shape[a]):
                break
            kept.append(a)
            ways *= mesh.shape[a]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
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
    attention that XLA's partitioner splits by itself. `sequence_parallel` applies when q and k/v have their
    tokens split over the same mesh axis: `allgather` then runs `implementation` on the gathered keys, `ring`
    runs ring attention (`ring_attention`, one blockwise kernel whatever `implementation` says).
    """
    if sequence_parallel not in SEQUENCE_PARALLEL:
        raise ValueError(f"sequence_parallel {sequence_parallel!r} is not one of {SEQUENCE_PARALLEL}")
    impl = resolve(implementation, q.dtype, kv_tokens=k.shape[1])
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
    if impl in ("xla", "chunked") and not split_keys:  # plain JAX: XLA's partitioner splits it
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
