"""Building blocks of the spacetime DiT: tubelet patches, position information, conditioning, attention.

Every parameter is created with logical axis names (`vdit_jax.parallel.sharding`) and key activations are
constrained with them, so the same modules run on one device or on any mesh the config's rules describe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.models import attention
from vdit_jax.parallel import sharding as sh

Dtype = Any
Grid = tuple[int, int, int]  # token grid (T', H', W') after patching

ATTENTION_LAYOUTS = ("full", "factorized", "windowed")
POS_EMBEDDINGS = ("sincos", "rope", "sincos+rope")


# ----------------------------------------------------------------------------------------------------
# Tubelet patches.


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
    """[B, T, H, W, C] -> [B, N, pt*ph*pw*C] with tokens in (t, h, w) raster order."""
    pt, ph, pw = patch
    return einops.rearrange(x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: jax.Array, patch: Sequence[int], grid: Grid, channels: int) -> jax.Array:
    """[B, N, pt*ph*pw*C] -> [B, T, H, W, C]; the inverse of `patchify`."""
    pt, ph, pw = patch
    t, h, w = grid
    return einops.rearrange(
        tokens,
        "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
        t=t,
        h=h,
        w=w,
        pt=pt,
        ph=ph,
        pw=pw,
        c=channels,
    )


def token_grid(video_shape: Sequence[int], patch: Sequence[int]) -> Grid:
    """Token grid of a [B, T, H, W, C] video; raises a clear error when the patch does not divide it."""
    _, t, h, w, _ = video_shape
    if any(d % p for d, p in zip((t, h, w), patch, strict=True)):
        raise ValueError(f"patch_size {tuple(patch)} must divide the video (T, H, W) = {(t, h, w)} in every dimension")
    return (t // patch[0], h // patch[1], w // patch[2])


# ----------------------------------------------------------------------------------------------------
# Position information (fixed tables in float64 NumPy, cast once).


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """[N] -> [N, dim] with sin in the first half and cos in the second (MAE / DiT convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(grid: Grid, dim: int) -> np.ndarray:
    """Separable spatial + temporal table [T'*H'*W', dim]: a 2D (h, w) table plus a 1D temporal table.

    The spatial part splits `dim` between h and w (DiT); the temporal part is added on top (Latte / Open-Sora),
    so frames share spatial codes and differ by their temporal code.
    """
    t, h, w = grid
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for 3D sin-cos embeddings, got {dim}")
    emb_h = sincos_1d(np.arange(h), dim // 2)  # [H', D/2]
    emb_w = sincos_1d(np.arange(w), dim // 2)  # [W', D/2]
    spatial = np.concatenate(
        [np.repeat(emb_h[:, None], w, axis=1), np.repeat(emb_w[None], h, axis=0)], axis=-1
    )  # [H', W', D]
    temporal = sincos_1d(np.arange(t), dim)  # [T', D]
    return (temporal[:, None, None] + spatial[None]).reshape(t * h * w, dim)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Per-axis widths (t, h, w) of a head for 3D RoPE; each even, h and w equal (as in Wan / Open-Sora)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: Grid, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [N, head_dim // 2] for rotary embeddings over the (t, h, w) token grid."""
    angles = []
    coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    for axis, width in enumerate(rope_split(head_dim)):
        freqs = 1.0 / theta ** (np.arange(0, width, 2, dtype=np.float64) / width)  # [width/2]
        angles.append(coords[:, axis : axis + 1].astype(np.float64) * freqs[None])
    ang = np.concatenate(angles, axis=-1)  # [N, head_dim/2]
    return np.cos(ang), np.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates consecutive pairs of x [B, N, heads, Dh] by the per-token angles (cos, sin: [N, Dh/2])."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Attention layouts: which tokens attend to which, as a regrouping of the token axis.


def layout_groups(layout: str, grid: Grid, window: Grid | None = None) -> tuple[str, dict]:
    """The einops pattern that regroups [B, N, ...] tokens into [B*G, L, ...] attention groups.

    full: one group of all N tokens; spatial: one group per frame; temporal: one group per location;
    window: non-overlapping (wt, wh, ww) spacetime windows.
    """
    t, h, w = grid
    if layout == "full":
        return "b n ... -> b n ...", {}
    if layout == "spatial":
        return "b (t s) ... -> (b t) s ...", {"t": t}
    if layout == "temporal":
        return "b (t s) ... -> (b s) t ...", {"t": t}
    if layout == "window":
        wt, wh, ww = window
        return (
            "b (nt wt nh wh nw ww) ... -> (b nt nh nw) (wt wh ww) ...",
            {"nt": t // wt, "nh": h // wh, "nw": w // ww, "wt": wt, "wh": wh, "ww": ww},
        )
    raise ValueError(f"unknown attention grouping {layout!r}")


def group_tokens(x: jax.Array, layout: str, grid: Grid, window: Grid | None = None) -> jax.Array:
    pattern, sizes = layout_groups(layout, grid, window)
    return einops.rearrange(x, pattern, **sizes)


def ungroup_tokens(x: jax.Array, batch: int, layout: str, grid: Grid, window: Grid | None = None) -> jax.Array:
    """The inverse of `group_tokens` for a batch of `batch` videos."""
    pattern, sizes = layout_groups(layout, grid, window)
    lhs, rhs = pattern.split(" -> ")
    return einops.rearrange(x, f"{rhs} -> {lhs}", b=batch, **sizes)


def clip_window(window: Sequence[int], grid: Grid) -> Grid:
    """A window no larger than the grid; each side must then divide the grid."""
    win = tuple(min(int(a), g) for a, g in zip(window, grid, strict=True))
    if any(g % a for a, g in zip(win, grid, strict=True)):
        raise ValueError(f"attention window {tuple(window)} (clipped to {win}) must divide the token grid {grid}")
    return win


# ----------------------------------------------------------------------------------------------------
# Modules.


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    zero_init: bool = False,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
    kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x [B, N, D] modulated by per-example shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """Parameter-free LayerNorm (the affine part comes from adaLN)."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps t [B] -> [B, dim] (cos first, as in DiT)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D] through sinusoidal features and a 2-layer SiLU MLP."""

    hidden_size: int
    frequency_size: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = timestep_embedding(t, self.frequency_size).astype(self.dtype)
        x = dense(self.hidden_size, (sh.FREQ, sh.EMBED), name="mlp_in", **kw)(x)
        x = nn.silu(x)
        return dense(self.hidden_size, (sh.MLP, sh.EMBED), name="mlp_out", **kw)(x)


class LabelEmbedder(nn.Module):
    """Class label [B] -> [B, D]; index `num_classes` is the null class used for classifier-free guidance.

    With `factors` (product `num_classes`), a label is read as mixed-radix digits, most significant first, and
    embedded as the sum of one embedding per digit (each table has its own null row); otherwise one table row per
    class.
    """

    num_classes: int
    hidden_size: int
    factors: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _table(self, rows: int, name: str) -> nn.Embed:
        return nn.Embed(
            rows,
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (sh.VOCAB, sh.EMBED)),
            name=name,
        )

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        if not self.factors:
            return self._table(self.num_classes + 1, "table")(labels)
        null = labels >= self.num_classes
        rest, out = labels, 0.0
        for i in reversed(range(len(self.factors))):
            f = self.factors[i]
            digit = jnp.where(null, f, rest % f)
            rest = rest // f
            out = out + self._table(f + 1, f"factor{i}")(digit)
        return out


def qk_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.RMSNorm:
    """The RMSNorm of a query or key head [..., Dh] (QK-norm), its scale split like the head width."""
    return nn.RMSNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.KV,)),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and optional 3D RoPE, over one token grouping.

    The q/k/v projections and the output projection act on all N tokens; only the attention itself is computed
    within groups (`layout`: full / spatial / temporal / window), so every layout has the same parameters.
    """

    num_heads: int
    layout: str = "full"
    window: Grid | None = None
    qk_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"  # attention.IMPLEMENTATIONS
    sequence_parallel: str = "allgather"  # attention.SEQUENCE_PARALLEL

    @nn.compact
    def __call__(self, x: jax.Array, grid: Grid, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.ACT_KV)

        def heads(name):
            y = dense(d, (sh.EMBED, sh.HEADS), name=name, **kw)(x)
            return nn.with_logical_constraint(y.reshape(b, n, self.num_heads, head_dim), act)

        q, k, v = heads("query"), heads("key"), heads("value")  # [B, N, heads, Dh]
        if self.qk_norm:
            norm = lambda name: qk_norm(self.dtype, self.param_dtype, name)
            q, k = norm("query_norm")(q), norm("key_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        # Full attention keeps the token axis (split over `sequence` by the rules); groupings fold it into the
        # batch, an axis of independent groups split over the data axes and `sequence` alike.
        axes = act if self.layout == "full" else (sh.GROUPS, None, sh.ACT_HEADS, sh.ACT_KV)
        q, k, v = (nn.with_logical_constraint(group_tokens(a, self.layout, grid, self.window), axes) for a in (q, k, v))
        out = attention.attend(
            q, k, v, implementation=self.implementation, sequence_parallel=self.sequence_parallel, q_axes=axes
        )  # [B*G, L, heads, Dh]
        out = ungroup_tokens(out, b, self.layout, grid, self.window)
        out = nn.with_logical_constraint(out, act).reshape(b, n, d)
        return dense(d, (sh.HEADS, sh.EMBED), name="out", **kw)(out)


class TextEmbedder(nn.Module):
    """Precomputed text-encoder embeddings [B, L, text_dim] -> context [B, L, D] (Dense, tanh-GELU, Dense).

    The two-layer projection of PixArt-α's caption projection and Wan's `text_embedding`; it is computed once per
    forward pass and shared by the cross-attention of every block.
    """

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = (sh.BATCH, sh.TEXT_LENGTH, sh.ACT_EMBED)
        h = dense(self.hidden_size, (sh.TEXT_EMBED, sh.EMBED), name="proj_in", **kw)(text.astype(self.dtype))
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), act)
        h = dense(self.hidden_size, (sh.MLP, sh.EMBED), name="proj_out", **kw)(h)
        return nn.with_logical_constraint(h, act)


class PooledTextEmbedder(nn.Module):
    """The pooled text vector added to the timestep embedding that drives every adaLN modulation (SD3's and Flux's
    pooled CLIP vector `y`): the masked mean of the text's token embeddings [B, L, text_dim] over its real tokens
    (`text_mask` bool [B, L]; an example with none pools to zeros), through Dense, SiLU, Dense -> [B, D].

    A sentence-level summary every token sees from the first block on (the attribute words a class embedding would
    carry), next to the token-level reading of cross- or joint attention. Both layers start from the ordinary
    (Xavier) initialisation, as SD3's pooled projection does. For precomputed embeddings; the built-in encoder's
    pooled vector is `text.BagOfWords` (this, on its outputs, did not learn the direction words: see there).
    """

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: jax.Array, text_mask: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text = text.astype(jnp.float32)
        if text_mask is None:
            pooled = text.mean(1)
        else:
            weights = text_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
            pooled = (text * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        h = dense(self.hidden_size, (sh.TEXT_EMBED, sh.EMBED), name="proj_in", **kw)(pooled.astype(self.dtype))
        h = nn.with_logical_constraint(nn.silu(h), (sh.BATCH, sh.ACT_EMBED))
        h = dense(self.hidden_size, (sh.MLP, sh.EMBED), name="proj_out", **kw)(h)
        return nn.with_logical_constraint(h, (sh.BATCH, sh.ACT_EMBED))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from video tokens x [B, N, D] to a text context [B, L, D], with QK RMSNorm.

    Queries come from the (pre-normed) video tokens, keys and values from the context; every video token sees the
    context tokens that `context_mask` (bool [B, L], None = all) marks real, never the padding. The output
    projection is zero-initialised, so the sublayer adds nothing at initialisation (the adaLN-Zero idea, as in
    PixArt-α): a fresh model still predicts exactly zero.
    """

    num_heads: int
    qk_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"  # attention.IMPLEMENTATIONS
    query_axis: str = sh.LENGTH  # logical axis of the queries' tokens (sh.TEXT_LENGTH: text attending to text)

    @nn.compact
    def __call__(
        self,
        x: jax.Array | None,
        context: jax.Array | None,
        context_mask: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ):
        """x [B, N, D] -> [B, N, D]. `kv`: this layer's keys and values of the context, computed before (the
        sampler's text cache: they depend on the text only); x None: returns them, (k, v) [B, L, heads, Dh] each."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: qk_norm(self.dtype, self.param_dtype, name)

        def heads(name, src, length_axis):
            b, tokens, d = src.shape
            y = dense(d, (sh.EMBED, sh.HEADS), name=name, **kw)(src).reshape(
                b, tokens, self.num_heads, d // self.num_heads
            )
            return nn.with_logical_constraint(y, (sh.BATCH, length_axis, sh.ACT_HEADS, sh.ACT_KV))

        if kv is None:
            k = heads("key", context, sh.TEXT_LENGTH)  # [B, L, heads, Dh]
            v = heads("value", context, sh.TEXT_LENGTH)
            if self.qk_norm:
                k = norm("key_norm")(k)
        else:
            k, v = kv
        if x is None:
            return k, v
        b, n, d = x.shape
        q = heads("query", x, self.query_axis)  # [B, N, heads, Dh]
        if self.qk_norm:
            q = norm("query_norm")(q)
        out = attention.attend(
            q,
            k,
            v,
            kv_mask=context_mask,
            implementation=self.implementation,
            q_axes=(sh.BATCH, self.query_axis, sh.ACT_HEADS, sh.ACT_KV),
            kv_axes=(sh.BATCH, sh.TEXT_LENGTH, sh.ACT_HEADS, sh.ACT_KV),
        )  # [B, N, heads, Dh]
        out = nn.with_logical_constraint(out, (sh.BATCH, self.query_axis, sh.ACT_HEADS, sh.ACT_KV)).reshape(b, n, d)
        return dense(d, (sh.HEADS, sh.EMBED), zero_init=True, name="out", **kw)(out)


class Mlp(nn.Module):
    """Pre-norm transformer MLP with tanh-GELU (DiT)."""

    hidden_size: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.mlp_dim, (sh.EMBED, sh.MLP), name="fc1", **kw)(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), (sh.BATCH, sh.LENGTH, sh.ACT_MLP))
        return dense(self.hidden_size, (sh.MLP, sh.EMBED), name="fc2", **kw)(h)


def frame_channels(given_frames: jax.Array | None, frame_mask: jax.Array | None, shape) -> jax.Array:
    """The frame-conditioning input channels [B, T, H, W, C + 1]: the given frames zeroed where not given, then the
    mask as 0 / 1 (all zeros when nothing is given)."""
    if given_frames is None:
        return jnp.zeros((*shape[:-1], shape[-1] + 1), jnp.float32)
    m = frame_mask.astype(jnp.float32)[:, :, None, None, None]
    given = given_frames.astype(jnp.float32) * m
    return jnp.concatenate([given, jnp.broadcast_to(m, (*shape[:-1], 1))], -1)
