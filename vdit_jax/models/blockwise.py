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
# Query-chunked attention for CPUs: every key at once, a chunk of queries of a few heads at a time.

TILE_ELEMENTS = 2**21  # float32 scores per chunk (8 MiB): the largest tile measured not to slow XLA's CPU dots


def query_chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: jax.Array | None = None,
    *,
    block_q: int = 512,
    tile_elements: int = TILE_ELEMENTS,
) -> jax.Array:
    """Exact attention q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (scale 1/sqrt(D)), `block_q` queries
    of a few (batch, head) pairs at a time against all keys, forward and backward; `kv_mask` bool [B, Lk], True =
    a real key; a query with no real key gets zeros.

    The CPU path of `attention.attend`. A chunk's scores ([g, block_q, Lk] float32, g (batch, head) pairs chosen so
    that the tile holds at most `tile_elements`) stay in the caches, where plain attention (`attention.xla_attention`)
    writes all [B, H, Lq, Lk] of them to memory and reads them back for the softmax and for P @ V. The custom VJP
    keeps q, k, v, the output and its log-sum-exp and recomputes each chunk's probabilities (FlashAttention-2's
    backward, by query chunks), so reverse mode stores no scores either. The backward works on transposed scores
    [g, Lk, bq] with K^T precomputed, so that every one of its five matmuls is a plain or right-transposed product:
    XLA's CPU runs a left-transposed one (P^T dO in the usual layout) at under half the speed (measured on 2
    Sapphire Rapids cores: 80-115 against 200-290 GFLOP/s).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq = min(block_q, lq)
    nq = -(-lq // bq)
    bh = b * h
    g = max([n for n in range(1, bh + 1) if bh % n == 0 and n * bq * lk <= tile_elements] or [1])

    def heads_major(x):  # [B, L, H, D] -> [BH / g, g, L, D]
        return jnp.swapaxes(x, 1, 2).reshape(bh // g, g, x.shape[1], d)

    qc = heads_major(_pad(q, 1, bq)).reshape(bh // g, g, nq, bq, d).transpose(0, 2, 1, 3, 4)  # [ng, nq, g, bq, D]
    mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask.astype(bool)
    bias = jnp.broadcast_to(jnp.where(mask, 0.0, MASKED_LOGIT)[:, None, :], (b, h, lk)).reshape(bh // g, g, lk)
    out = _chunked(qc, heads_major(k), heads_major(v), bias.astype(jnp.float32))  # [ng, nq, g, bq, D]
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, h, nq * bq, d)[:, :, :lq]
    return jnp.swapaxes(out, 1, 2)


def _chunk_forward(q, k, v, bias):
    """One chunk q [g, bq, D] against k/v [g, Lk, D] (bias [g, Lk]) -> (out [g, bq, D] float32, lse [g, bq])."""
    s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
    s = s + bias[:, None, :]
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    lse = (m + jnp.log(denom))[..., 0]
    return jnp.where(has_key(lse)[..., None], out, 0.0), lse


@jax.custom_vjp
def _chunked(qc, kg, vg, bias):
    return _chunked_fwd(qc, kg, vg, bias)[0]


def _chunked_fwd(qc, kg, vg, bias):
    def group(xs):
        q, k, v, b = xs
        return jax.lax.map(lambda qq: _chunk_forward(qq, k, v, b), q)

    out, lse = jax.lax.map(group, (qc, kg, vg, bias))  # [ng, nq, g, bq, D], [ng, nq, g, bq]
    out = out.astype(qc.dtype)
    return out, (qc, kg, vg, bias, out, lse)


def _chunked_bwd(res, dout):
    qc, kg, vg, bias, out, lse = res
    dout = jnp.where(has_key(lse)[..., None], dout.astype(jnp.float32), 0.0)
    delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)  # [ng, nq, g, bq]
    scale = 1.0 / math.sqrt(qc.shape[-1])

    def group(xs):
        q_all, do_all, lse_all, delta_all, k, v, b = xs  # one group: [nq, g, bq, ...], k/v [g, Lk, D], b [g, Lk]
        kt = jax.lax.optimization_barrier(jnp.swapaxes(k, 1, 2))  # [g, D, Lk]: a copy, so dQ^T = K^T dS^T is plain

        def step(dkv, xs):
            q, do, lse_q, delta_q = xs
            st = jnp.einsum("gkd,gqd->gkq", k, q, preferred_element_type=jnp.float32) * scale  # [g, Lk, bq]
            pt = jnp.exp(st + b[:, :, None] - lse_q[:, None, :])
            dv = jnp.einsum("gkq,gqd->gkd", pt, do)
            dpt = jnp.einsum("gkd,gqd->gkq", v, do, preferred_element_type=jnp.float32)
            dst = pt * (dpt - delta_q[:, None, :])
            dk = jnp.einsum("gkq,gqd->gkd", dst, q, preferred_element_type=jnp.float32)
            dqt = jnp.einsum("gdk,gkq->gdq", kt, dst, preferred_element_type=jnp.float32)  # [g, D, bq]
            return (dkv[0] + dk, dkv[1] + dv), dqt

        zeros = jnp.zeros(k.shape, jnp.float32)
        (dk, dv), dqt = jax.lax.scan(step, (zeros, zeros), (q_all, do_all, lse_all, delta_all))
        return scale * jnp.swapaxes(dqt, -1, -2), scale * dk, dv

    dq, dk, dv = jax.lax.map(group, (qc, dout, lse, delta, kg, vg, bias))
    return dq.astype(qc.dtype), dk.astype(kg.dtype), dv.astype(vg.dtype), jnp.zeros_like(bias)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
