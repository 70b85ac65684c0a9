"""MM-DiT joint attention blocks (`DiTConfig.text_mode = "joint"`): text and video tokens attend jointly.

As in SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers"), Flux and HunyuanVideo: the text tokens form a
second stream that runs beside the video tokens through every block. A **dual-stream** block gives each stream its
own weights (adaLN-Zero modulation, LayerNorms, q/k/v and output projections, QK RMSNorms, MLP) and one attention
over the concatenated tokens; a **single-stream** block (Flux's, `DiTConfig.single_stream_blocks` of the last
blocks) shares one set of weights between the streams (here the sequential attention-then-MLP layout, not Flux's
parallel one). Both streams are modulated by the same conditioning vector (timestep, and class when there is one).

Positions: the video tokens' queries and keys get the 3D RoPE of their (t, h, w); the text tokens sit at position
(0, 0, 0), Flux's `txt_ids` of zeros, where the rotation is the identity (their order is already in the text
encoder's output). Masks: a padded text token gives no attention (its key is masked for every query) and gets none
(its outputs are zeroed), so the video output does not change when a prompt is padded further.

Joint attention is computed as two `attention.attend` calls that share the keys and values [text; video]: the video
queries (their tokens split over `sequence` under sequence parallelism) and the text queries (whole on every
device). With the keys of the concatenation kept whole, every kernel and mask path of `attend` serves it (xla,
cuDNN, splash), and under sequence parallelism the video keys are all-gathered (`allgather` semantics whatever
`sequence_parallel` says: a ring over a concatenation of a replicated and a split part is not implemented).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit_jax.models import attention, layers
from vdit_jax.parallel import sharding as sh

if TYPE_CHECKING:
    from vdit_jax.models.dit import DiTConfig

TEXT_MODES = ("cross", "joint")

_VIDEO = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.ACT_KV)
_TEXT = (sh.BATCH, sh.TEXT_LENGTH, sh.ACT_HEADS, sh.ACT_KV)
_JOINT = (sh.BATCH, None, sh.ACT_HEADS, sh.ACT_KV)  # the concatenated keys: whole on every device


def joint_attention(
    q: tuple[jax.Array, jax.Array],
    k: tuple[jax.Array, jax.Array],
    v: tuple[jax.Array, jax.Array],
    text_mask: jax.Array,
    *,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Attention of (video, text) queries over the keys and values of both: q/k/v pairs of video [B, N, H, Dh] and
    text [B, L, H, Dh]; `text_mask` bool [B, L] (True = a real token). Returns (video [B, N, H, Dh], text
    [B, L, H, Dh]); a padded text query gets zeros."""
    (qx, qt), (kx, kt), (vx, vt) = q, k, v
    keys = nn.with_logical_constraint(jnp.concatenate([kt, kx], axis=1), _JOINT)
    values = nn.with_logical_constraint(jnp.concatenate([vt, vx], axis=1), _JOINT)
    kv_mask = jnp.concatenate([text_mask, jnp.ones(kx.shape[:2], bool)], axis=1)
    run = lambda queries, axes: attention.attend(
        queries, keys, values, kv_mask=kv_mask, implementation=implementation, q_axes=axes, kv_axes=_JOINT
    )
    out_x = run(qx, _VIDEO)
    out_t = jnp.where(text_mask[:, :, None, None], run(qt, _TEXT), jnp.zeros((), qt.dtype))
    return out_x, out_t


class _Stream(nn.Module):
    """The per-stream weights of a block: adaLN-Zero modulation (6 x width), q/k/v, QK RMSNorms, output projection
    and MLP. `prepare` gives (q, k, v) of a stream's pre-normed modulated tokens; `finish` adds the gated attention
    output and the gated MLP."""

    config: DiTConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        d = cfg.hidden_size
        self.adaLN = layers.dense(6 * d, (sh.EMBED, sh.MLP), zero_init=True, name="adaLN", **kw)
        self.query = layers.dense(d, (sh.EMBED, sh.HEADS), name="query", **kw)
        self.key = layers.dense(d, (sh.EMBED, sh.HEADS), name="key", **kw)
        self.value = layers.dense(d, (sh.EMBED, sh.HEADS), name="value", **kw)
        norm = lambda name: layers.qk_norm(kw["dtype"], kw["param_dtype"], name)
        if cfg.qk_norm:
            self.query_norm, self.key_norm = norm("query_norm"), norm("key_norm")
        self.norm1 = layers.layer_norm(kw["dtype"], name="norm1")
        self.norm2 = layers.layer_norm(kw["dtype"], name="norm2")
        self.out = layers.dense(d, (sh.HEADS, sh.EMBED), name="out", **kw)
        self.mlp = layers.Mlp(d, cfg.mlp_dim, name="mlp", **kw)

    def modulation(self, c: jax.Array) -> list[jax.Array]:
        return jnp.split(self.adaLN(nn.silu(c)), 6, axis=-1)  # 6 x [B, D]

    def prepare(self, x: jax.Array, mod: list[jax.Array], axes) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        b, n, d = x.shape
        h = layers.modulate(self.norm1(x), mod[0], mod[1])

        def heads(proj):
            return nn.with_logical_constraint(proj(h).reshape(b, n, cfg.num_heads, d // cfg.num_heads), axes)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        if cfg.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        return q, k, v

    def finish(self, x: jax.Array, attn: jax.Array, mod: list[jax.Array], axes) -> jax.Array:
        b, n, d = x.shape
        x = x + mod[2][:, None] * self.out(nn.with_logical_constraint(attn, axes).reshape(b, n, d))
        return x + mod[5][:, None] * self.mlp(layers.modulate(self.norm2(x), mod[3], mod[4]))


class JointBlock(nn.Module):
    """One MM-DiT block over the carry (video x [B, N, D], text context [B, L, D]): dual-stream (`single=False`:
    weights `video` and `text`) or single-stream (one set of weights, `stream`). Returns ((x, context), None), the
    carry of `nn.scan`."""

    config: DiTConfig
    single: bool = False

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], c: jax.Array, rope, context_mask: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
        cfg = self.config
        x, ctx = carry
        if self.single:
            video = text = _Stream(cfg, name="stream")
        else:
            video, text = _Stream(cfg, name="video"), _Stream(cfg, name="text")
        mod_x = video.modulation(c)
        mod_t = mod_x if self.single else text.modulation(c)
        qx, kx, vx = video.prepare(x, mod_x, _VIDEO)
        qt, kt, vt = text.prepare(ctx, mod_t, _TEXT)
        if rope is not None:  # video tokens at their (t, h, w); text tokens at (0, 0, 0): no rotation
            qx, kx = layers.apply_rope(qx, *rope), layers.apply_rope(kx, *rope)
        out_x, out_t = joint_attention((qx, qt), (kx, kt), (vx, vt), context_mask, implementation=cfg.attention_impl)
        x = video.finish(x, out_x, mod_x, _VIDEO)
        ctx = text.finish(ctx, out_t, mod_t, _TEXT)
        ctx = jnp.where(context_mask[:, :, None], ctx, jnp.zeros((), ctx.dtype))  # padding stays zero
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        ctx = nn.with_logical_constraint(ctx, (sh.BATCH, sh.TEXT_LENGTH, sh.ACT_EMBED))
        return (x, ctx), None
