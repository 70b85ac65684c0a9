"""Blockwise (online-softmax) attention: exact attention one K/V block at a time, in O(block) memory.

    from vdit_jax.models import blockwise
    out = blockwise.attention(q, k, v, kv_mask, block_k=512)   # q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]

The pieces, shared by every blockwise path (`attention` here, ring attention in `vdit_jax.models.attention`):

  init(q)                         an empty accumulator `Carry(out, lse)`, float32
  update(carry, q, k, v, mask)    folds one K/V block (with its key-mask block) into the accumulator
  finalize(carry, dtype)          the attention output; zeros for a query that saw no real key
  block_grads(...)                one block's share of dq, dk, dv (the FlashAttention-2 backward)

The accumulator holds the output normalised over the keys folded so far and the log-sum-exp of their logits, so
two partial results merge by their log-sum-exp. Masked keys get a large finite negative logit (never -inf, so no
inf - inf): a block with no real key adds nothing, and a query with no real key in any block keeps a log-sum-exp
near that logit, which `finalize` turns into zeros (never NaN, gradients included).

Both drivers have a custom VJP: the forward keeps only q, k, v, the mask, the output and its log-sum-exp; the
backward recomputes one block's probabilities at a time from the log-sum-exp. Reverse mode therefore never holds
more than one [Lq_block, Lk_block] block of scores, where differentiating straight through the loop would store
every block's probabilities (as much as materialising the whole [Lq, Lk] score matrix).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

MASKED_LOGIT = -1e30  # a masked key's logit: finite, so a block of masked keys gives no inf - inf
_NO_KEY_LSE = -1e29  # a log-sum-exp below this saw masked keys only (real logits are nowhere near)
BLOCK_K = 512


class Carry(NamedTuple):
    """The running result of attention to the key blocks folded so far."""

    out: jax.Array  # [B, Lq, H, D] float32, normalised over those keys
    lse: jax.Array  # [B, Lq, H] float32, log-sum-exp of their (scaled) logits


def init(q: jax.Array) -> Carry:
    """The accumulator before any key block: no weight anywhere."""
    # `*_like`: inside shard_map the accumulator varies over the same mesh axes as q.
    return Carry(jnp.zeros_like(q, jnp.float32), jnp.full_like(q[..., 0], MASKED_LOGIT, jnp.float32))


def _logits(q: jax.Array, k: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
    """Scaled logits [B, Lq, H, Lk] in float32, masked keys at MASKED_LOGIT."""
    logits = jnp.einsum("bqhd,bkhd->bqhk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :], logits, MASKED_LOGIT)
    return logits


def update(carry: Carry, q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None = None) -> Carry:
    """Folds the block k/v [B, Lk_blk, H, D] (`kv_mask` bool [B, Lk_blk], True = real) into `carry`.

    Softmax scale 1/sqrt(D); matmuls in the inputs' dtype with float32 accumulation, everything else in float32.
    """
    logits = _logits(q, k, kv_mask)
    lse_blk = jax.nn.logsumexp(logits, axis=-1)  # [B, Lq, H]
    probs = jnp.exp(logits - lse_blk[..., None]).astype(v.dtype)
    out_blk = jnp.einsum("bqhk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
    lse = jnp.logaddexp(carry.lse, lse_blk)
    out = carry.out * jnp.exp(carry.lse - lse)[..., None] + out_blk * jnp.exp(lse_blk - lse)[..., None]
    return Carry(out, lse)


def has_key(lse: jax.Array) -> jax.Array:
    """bool [B, Lq, H]: whether a query's log-sum-exp includes at least one real key."""
    return lse > _NO_KEY_LSE


def finalize(carry: Carry, dtype) -> jax.Array:
    """The attention output [B, Lq, H, D] in `dtype`; zeros for a query that saw no real key."""
    return jnp.where(has_key(carry.lse)[..., None], carry.out, 0.0).astype(dtype)


def backward_inputs(out: jax.Array, lse: jax.Array, dout: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dout float32 with the rows of key-less queries zeroed, delta = rowsum(dout * out) [B, Lq, H]) for
    `block_grads`."""
    dout = jnp.where(has_key(lse)[..., None], dout.astype(jnp.float32), 0.0)
    return dout, jnp.sum(dout * out.astype(jnp.float32), axis=-1)


def block_grads(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: jax.Array | None,
    lse: jax.Array,
    dout: jax.Array,
    delta: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One K/V block's share (float32) of dq [B, Lq, H, D], dk and dv [B, Lk_blk, H, D], from the final
    log-sum-exp and `backward_inputs` (dout, delta): the probabilities are recomputed, never stored."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = jnp.exp(_logits(q, k, kv_mask) - lse[..., None])  # [B, Lq, H, Lk_blk]
    dv = jnp.einsum("bqhk,bqhd->bkhd", probs, dout)
    dprobs = jnp.einsum("bqhd,bkhd->bqhk", dout, v, preferred_element_type=jnp.float32)
    dlogits = probs * (dprobs - delta[..., None])
    dq = scale * jnp.einsum("bqhk,bkhd->bqhd", dlogits, k, preferred_element_type=jnp.float32)
    dk = scale * jnp.einsum("bqhk,bqhd->bkhd", dlogits, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Local blockwise attention: query and key blocks of one device.


def _pad(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -x.shape[axis] % multiple)
    return jnp.pad(x, widths)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, L, ...] (L a multiple of `size`) -> [L / size, B, size, ...]."""
    return jnp.swapaxes(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 0, 1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: jax.Array | None = None,
    *,
    block_q: int | None = None,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Exact attention q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (scale 1/sqrt(D)), computed `block_q`
    queries (None: all) by `block_k` keys at a time, forward and backward; `kv_mask` bool [B, Lk], True = a real
    key. A query with no real key gets zeros. Token counts need not be block multiples (padded, padding masked)."""
    b, lq = q.shape[:2]
    lk = k.shape[1]
    bq, bk = min(block_q or lq, lq), min(block_k, lk)
    mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask.astype(bool)
    qb = _blocks(_pad(q, 1, bq), bq)
    kb, vb, mb = (_blocks(_pad(a, 1, bk), bk) for a in (k, v, mask))  # padded keys: mask False
    out = _blocked(qb, kb, vb, mb)  # [Lq / bq, B, bq, H, D]
    return jnp.swapaxes(out, 0, 1).reshape(b, -1, *q.shape[2:])[:, :lq]


def _sweep(q, kb, vb, mb) -> Carry:
    """One query block [B, bq, H, D] against every key block [nk, B, bk, ...]."""
    carry, _ = jax.lax.scan(lambda c, blk: (update(c, q, *blk), None), init(q), (kb, vb, mb))
    return carry


@jax.custom_vjp
def _blocked(qb, kb, vb, mb):
    return _blocked_fwd(qb, kb, vb, mb)[0]


def _blocked_fwd(qb, kb, vb, mb):
    carry = jax.lax.map(lambda q: _sweep(q, kb, vb, mb), qb)  # Carry of [nq, B, bq, ...]
    out = finalize(carry, qb.dtype)
    return out, (qb, kb, vb, mb, out, carry.lse)


def _blocked_bwd(res, dout):
    qb, kb, vb, mb, out, lse = res
    dout, delta = backward_inputs(out, lse, dout)

    def q_step(dkv, xs):
        q, do, lse_q, delta_q = xs

        def k_step(dq, blk):
            dq_b, dk_b, dv_b = block_grads(q, *blk, lse_q, do, delta_q)
            return dq + dq_b, (dk_b, dv_b)

        dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros_like(q, jnp.float32), (kb, vb, mb))
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = jnp.zeros_like(kb, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (qb, dout, lse, delta))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ----------------------------------------------------------------------------------------------------
# Query-chunked attention for CPUs: every key at once, a chunk of queries at a time, heads-major.


def query_chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None = None, *, block_q: int = 256
) -> jax.Array:
    """Exact attention q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (scale 1/sqrt(D)), `block_q` queries
    at a time against all keys, forward and backward; `kv_mask` bool [B, Lk], True = a real key; a query with no
    real key gets zeros.

    The CPU path of `attention.attend`: one chunk's scores [B, H, block_q, Lk] stay in the caches where XLA's
    `dot_product_attention` writes all [B, H, Lq, Lk] of them to memory and reads them back for the softmax and for
    P @ V (on 2 cores, 2,048 tokens of 6 heads x 64: the forward 3x faster). The custom VJP keeps only q, k, v,
    the output and its log-sum-exp and recomputes each chunk's probabilities in the backward (FlashAttention-2's
    backward by query chunks), so reverse mode stores no scores either. Heads-major ([B, H, L, D]) matmuls: XLA's
    CPU dot is fastest with the batch axes leading.
    """
    b, lq, h, d = q.shape
    bq = min(block_q, lq)
    nq = -(-lq // bq)
    qc = jnp.transpose(_pad(q, 1, bq).reshape(b, nq, bq, h, d), (1, 0, 3, 2, 4))  # [nq, B, H, bq, D]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H, Lk, D]
    bias = None
    if kv_mask is not None:
        bias = jnp.where(kv_mask.astype(bool), 0.0, MASKED_LOGIT).astype(jnp.float32)[:, None, None, :]
    out = _chunked(qc, kh, vh, bias)  # [nq, B, H, bq, D]
    return jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, nq * bq, h, d)[:, :lq]


def _chunk_logits(q, k, bias):
    """Scaled logits [B, H, bq, Lk] in float32 (+ the key mask's bias: 0 or MASKED_LOGIT)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    return s if bias is None else s + bias


def _chunk_forward(q, k, v, bias):
    s = _chunk_logits(q, k, bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    lse = (m + jnp.log(denom))[..., 0]  # [B, H, bq]
    return jnp.where(has_key(lse)[..., None], out, 0.0), lse


@jax.custom_vjp
def _chunked(qc, kh, vh, bias):
    return _chunked_fwd(qc, kh, vh, bias)[0]


def _chunked_fwd(qc, kh, vh, bias):
    out, lse = jax.lax.map(lambda q: _chunk_forward(q, kh, vh, bias), qc)
    out = out.astype(qc.dtype)
    return out, (qc, kh, vh, bias, out, lse)


def _chunked_bwd(res, dout):
    qc, kh, vh, bias, out, lse = res
    dout = jnp.where(has_key(lse)[..., None], dout.astype(jnp.float32), 0.0)
    delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)  # [nq, B, H, bq]
    scale = 1.0 / math.sqrt(qc.shape[-1])

    def step(dkv, xs):
        q, do, lse_q, delta_q = xs
        p = jnp.exp(_chunk_logits(q, kh, bias) - lse_q[..., None])  # [B, H, bq, Lk]
        dv = jnp.einsum("bhqk,bhqd->bhkd", p, do)
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, vh, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_q[..., None])
        dq = scale * jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=jnp.float32)
        dk = scale * jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = jnp.zeros(kh.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (qc, dout, lse, delta))
    dbias = None if bias is None else jnp.zeros_like(bias)
    return dq.astype(qc.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), dbias


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
