"""The U-Net frame interpolator: a diffusion U-Net over the frames of a video segment.

A 2D convolutional encoder / decoder with skip connections applied to every frame (frames folded into the batch),
ResNet blocks conditioned on the diffusion timestep, spatial self-attention at the low resolutions, and after every
ResNet block a temporal layer (attention over the frames at each pixel, or a 1D convolution over time) so every
frame sees the others (the factorised space-time U-Net of Ho et al. 2022, "Video Diffusion Models"). Normalisation
is GroupNorm per frame, never across time. Keyframes enter as conditioning channels with a per-frame mask (MCVD,
Voleti et al. 2022): x_t ++ keyframes ++ mask, so one model fills any gap up to its segment length. With
`bracket_keyframes` (the default) every frame also gets the nearest given frame before it and after it and its
fractional time between the two, as frame-interpolation networks take both frames and the time t (FILM, Reda et
al. 2022): a frame between two keyframes then sees both at full resolution instead of only through the temporal
layers.

    net = UNet(unet_config(in_channels=3))
    params = net.init(rng, x_t, t, given_frames, frame_mask)   # x_t, given_frames [B, T, H, W, C]; frame_mask [B, T]
    pred = net.apply(params, x_t, t, given_frames, frame_mask)  # [B, T, H, W, C] float32; zeros at init

Parameters carry logical axis names (`vdit_jax.parallel.sharding`): dense kernels split their model width over
`embed` (fsdp) and their hidden width over `mlp` (tensor), like the DiT's; convolution kernels split only their
output width (over `embed`). With the input width of a convolution also split over `tensor`, XLA's CPU partitioner
computed wrong outputs on a data x fsdp x tensor mesh (jax 0.10: max error 0.017 against 1e-7 on one device, in
tests/models_unet_test.py's setting), so the kernels are not split that way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.models import layers
from vdit_jax.parallel import sharding as sh

TEMPORAL_LAYERS = ("attention", "conv")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the U-Net interpolator, validated on construction.

    Attributes:
      in_channels: channels of a frame (3 for RGB pixels); the output has the same.
      base_channels: width of the first level; level i has base_channels * channel_mults[i].
      channel_mults: one entry per resolution level; each level after the first halves H and W.
      num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
      attention_levels: levels (0 = full resolution) with spatial self-attention; the middle block always has it.
      num_heads: heads of the spatial and temporal attention.
      temporal: `attention` (over the frames at each position, with sin-cos frame positions) or `conv` (kernel 3).
      num_groups: GroupNorm groups (per frame); every level's width must be divisible by it.
      bracket_keyframes: also give every frame the given frames around it and its time between them
        (`bracket_channels`).
      dtype, param_dtype: compute and parameter dtypes.
    """

    in_channels: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    temporal: str = "attention"
    num_groups: int = 8
    bracket_keyframes: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"UNetConfig: {msg}")

        for name in ("in_channels", "base_channels", "num_res_blocks", "num_heads", "num_groups"):
            if int(getattr(self, name)) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if not self.channel_mults or any(int(m) <= 0 for m in self.channel_mults):
            fail(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mults):
                fail(f"attention_levels entry {level} must be in [0, {len(self.channel_mults)})")
        for mult in self.channel_mults:
            width = self.base_channels * mult
            if width % self.num_groups or width % self.num_heads:
                fail(
                    f"level width {width} must be divisible by num_groups {self.num_groups} and num_heads "
                    f"{self.num_heads}"
                )
        if self.temporal not in TEMPORAL_LAYERS:
            fail(f"temporal {self.temporal!r} is not one of {TEMPORAL_LAYERS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(f"{name} {getattr(self, name)!r} is not one of {DTYPES}")

    @property
    def downsampling(self) -> int:
        """H and W must be divisible by this (2 ** (levels - 1))."""
        return 2 ** (len(self.channel_mults) - 1)


def unet_config(**overrides: Any) -> UNetConfig:
    return UNetConfig(**overrides)


def bracket_channels(given_frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Per frame, the given frames around it: [B, T, H, W, 2C + 3] = the nearest given frame at or before it, the
    nearest at or after it (zeros where there is none), whether each exists (0 / 1), and its fractional time between
    them, alpha = (t - before) / (after - before) (0 on a given frame or without both).

    given_frames: float [B, T, H, W, C]; frame_mask: bool [B, T] (True = given).
    """
    t = frame_mask.shape[1]
    idx = jnp.arange(t)[None, :]
    before = jax.lax.cummax(jnp.where(frame_mask, idx, -1), axis=1)  # [B, T]; -1 = none
    after = jax.lax.cummin(jnp.where(frame_mask, idx, t), axis=1, reverse=True)  # t = none
    has_before, has_after = before >= 0, after < t

    def gather(index, has):
        frames = jnp.take_along_axis(given_frames, jnp.clip(index, 0, t - 1)[:, :, None, None, None], axis=1)
        return frames * has[:, :, None, None, None].astype(frames.dtype)

    both = has_before & has_after
    alpha = jnp.where(both & (after > before), (idx - before) / jnp.maximum(after - before, 1), 0.0)
    scalars = jnp.stack([has_before, has_after, alpha], -1).astype(jnp.float32)  # [B, T, 3]
    shape = (*given_frames.shape[:-1], 3)
    return jnp.concatenate(
        [
            gather(before, has_before).astype(jnp.float32),
            gather(after, has_after).astype(jnp.float32),
            jnp.broadcast_to(scalars[:, :, None, None, :], shape),
        ],
        -1,
    )


def _conv(features, kernel, axes, *, dtype, param_dtype, strides=1, zero_init=False, name=None) -> nn.Conv:
    """A convolution whose kernel [*kernel, in, out] and bias [out] carry logical axis names `axes` = (in, out)."""
    init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features,
        kernel,
        strides=strides,
        padding="SAME",
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, (None,) * len(kernel) + tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def _group_norm(groups: int, dtype, param_dtype, name=None) -> nn.GroupNorm:
    """GroupNorm over (H, W, channels of a group) of each frame: frames are folded into the batch."""
    return nn.GroupNorm(
        num_groups=groups,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.EMBED,)),
        name=name,
    )


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3, + the timestep embedding, GroupNorm -> SiLU -> conv 3x3 (zero-initialised),
    plus the input (through a 1x1 conv when the width changes). h: [B*T, H, W, C]; emb: [B*T, E]."""

    features: int
    config: UNetConfig

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = nn.silu(_group_norm(cfg.num_groups, name="norm1", **kw)(h))
        x = _conv(self.features, (3, 3), (None, sh.EMBED), name="conv1", **kw)(x)
        x = x + layers.dense(self.features, (sh.MLP, sh.EMBED), name="emb_proj", **kw)(nn.silu(emb))[:, None, None]
        x = nn.silu(_group_norm(cfg.num_groups, name="norm2", **kw)(x))
        x = _conv(self.features, (3, 3), (None, sh.EMBED), zero_init=True, name="conv2", **kw)(x)
        if h.shape[-1] != self.features:
            h = _conv(self.features, (1, 1), (None, sh.EMBED), name="skip", **kw)(h)
        return h + x


def _attention(x: jax.Array, num_heads: int, cfg: UNetConfig, name: str) -> jax.Array:
    """Pre-norm multi-head self-attention over axis 1 of x [G, N, C] with a zero-initialised output projection
    (a residual branch that starts closed)."""
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    g, n, c = x.shape
    y = layers.layer_norm(kw["dtype"], name=f"{name}_norm")(x)
    qkv = layers.dense(3 * c, (sh.EMBED, sh.MLP), name=f"{name}_qkv", **kw)(y)
    q, k, v = jnp.split(qkv.reshape(g, n, 3 * num_heads, c // num_heads).swapaxes(1, 2), 3, axis=1)  # [G, h, N, d]
    # Plain einsums with the heads ahead of the tokens: on XLA's CPU backend (jax 0.10) jax.nn.dot_product_attention
    # in its [G, N, h, d] layout took 44.6 ms against 7.3 ms this way over one 16x16 level of configs/multistage.py
    # (48 frames x 256 tokens x 16), and the whole U-Net's forward (batch 8 x 6 frames) 170 -> 109 ms (median of 8);
    # its gradient measured the same either way (485 / 501 ms).
    scores = jnp.einsum("ghnd,ghmd->ghnm", q, k) / np.sqrt(c // num_heads).astype(q.dtype)
    y = jnp.einsum("ghnm,ghmd->ghnd", jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype), v)
    y = y.swapaxes(1, 2).reshape(g, n, c)
    return x + layers.dense(c, (sh.MLP, sh.EMBED), zero_init=True, name=f"{name}_out", **kw)(y)


class SpatialAttention(nn.Module):
    """Self-attention over the H*W positions of each frame. h: [B*T, H, W, C]."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        bt, hh, ww, c = h.shape
        return _attention(h.reshape(bt, hh * ww, c), self.config.num_heads, self.config, "attn").reshape(h.shape)


class TemporalLayer(nn.Module):
    """Mixes the frames at each position: attention over T (with sin-cos frame positions) or a kernel-3 1D
    convolution over T, as a zero-initialised residual. h: [B*T, H, W, C] with T = `frames`."""

    config: UNetConfig
    frames: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        bt, hh, ww, c = h.shape
        b, t = bt // self.frames, self.frames
        x = h.reshape(b, t, hh * ww, c).swapaxes(1, 2).reshape(b * hh * ww, t, c)  # [B*H*W, T, C]
        if cfg.temporal == "attention":
            pos = jnp.asarray(layers.sincos_1d(np.arange(t), c), x.dtype)
            x = _attention(x + pos[None], cfg.num_heads, cfg, "temporal_attn") - pos[None]
        else:
            y = nn.silu(layers.layer_norm(kw["dtype"], name="temporal_norm")(x))
            x = x + _conv(c, (3,), (None, sh.EMBED), zero_init=True, name="temporal_conv", **kw)(y)
        return x.reshape(b, hh * ww, t, c).swapaxes(1, 2).reshape(bt, hh, ww, c)


class UNet(nn.Module):
    """The interpolator: `__call__(x, t, given_frames=None, frame_mask=None)` -> [B, T, H, W, C] (float32).

    x [B, T, H, W, C] (the noisy segment), t [B] diffusion timesteps, given_frames [B, T, H, W, C] clean keyframes and
    frame_mask bool [B, T] (True = a given keyframe; None = none given). H and W must be divisible by
    `config.downsampling`. Raises ValueError for inputs of other shapes.
    """

    config: UNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        given_frames: jax.Array | None = None,
        frame_mask: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet expects video [B, T, H, W, {cfg.in_channels}], got shape {tuple(x.shape)}")
        b, frames, hh, ww, c = x.shape
        if hh % cfg.downsampling or ww % cfg.downsampling:
            raise ValueError(f"UNet: H, W = {hh}, {ww} must be divisible by {cfg.downsampling} (its levels)")
        if (given_frames is None) != (frame_mask is None):
            raise ValueError("pass given_frames and frame_mask together (or neither: no keyframe given)")
        if given_frames is not None and (given_frames.shape != x.shape or frame_mask.shape != x.shape[:2]):
            raise ValueError(
                f"given_frames must be {tuple(x.shape)} and frame_mask [B, T] = {tuple(x.shape[:2])}, got "
                f"{tuple(given_frames.shape)} and {tuple(frame_mask.shape)}"
            )
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        channels = [x.astype(jnp.float32), layers.frame_channels(given_frames, frame_mask, x.shape)]
        if cfg.bracket_keyframes:
            if given_frames is None:
                given_frames, frame_mask = jnp.zeros_like(x), jnp.zeros(x.shape[:2], bool)
            channels.append(bracket_channels(given_frames.astype(jnp.float32), frame_mask))
        x = jnp.concatenate(channels, -1)
        x = nn.with_logical_constraint(x, (sh.BATCH, None, None, None, None))
        h = x.reshape(b * frames, hh, ww, x.shape[-1]).astype(dtype)  # frames folded into the batch

        emb_dim = 4 * cfg.base_channels
        emb = layers.TimestepEmbedder(emb_dim, name="t_embed", **kw)(t)  # [B, E]
        emb = jnp.repeat(emb, frames, axis=0)  # [B*T, E]: every frame of an example gets its t

        def stage(h, features, level, name):
            h = ResBlock(features, cfg, name=f"{name}_res")(h, emb)
            if level in cfg.attention_levels:
                h = SpatialAttention(cfg, name=f"{name}_attn")(h)
            return TemporalLayer(cfg, frames, name=f"{name}_temporal")(h)

        h = _conv(cfg.base_channels, (3, 3), (None, sh.EMBED), name="conv_in", **kw)(h)
        skips = [h]
        levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            for i in range(cfg.num_res_blocks):
                h = stage(h, cfg.base_channels * mult, level, f"down{level}_{i}")
                skips.append(h)
            if level < levels - 1:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                h = _conv(h.shape[-1], (3, 3), (None, sh.EMBED), name=f"down{level}_sample", **kw)(h)
                skips.append(h)

        width = h.shape[-1]
        h = ResBlock(width, cfg, name="mid_res1")(h, emb)
        h = SpatialAttention(cfg, name="mid_attn")(h)
        h = TemporalLayer(cfg, frames, name="mid_temporal")(h)
        h = ResBlock(width, cfg, name="mid_res2")(h, emb)

        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], -1)
                h = stage(h, cfg.base_channels * cfg.channel_mults[level], level, f"up{level}_{i}")
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour upsampling
                h = _conv(h.shape[-1], (3, 3), (None, sh.EMBED), name=f"up{level}_sample", **kw)(h)

        h = nn.silu(_group_norm(cfg.num_groups, name="norm_out", **kw)(h))
        out = _conv(c, (3, 3), (sh.EMBED, None), zero_init=True, name="conv_out", **kw)(h)
        return out.reshape(b, frames, hh, ww, c).astype(jnp.float32)


def init_params(config: UNetConfig, rng: jax.Array, video_shape: tuple[int, ...]):
    """Initialises (boxed, logically annotated) parameters for segments of `video_shape` [B, T, H, W, C]."""
    b, t = video_shape[:2]

    def init(rng):
        x = jnp.zeros(video_shape, jnp.float32)
        return UNet(config).init(rng, x, jnp.zeros((b,), jnp.int32), x, jnp.zeros((b, t), bool))

    return jax.jit(init)(rng)  # one compiled program, not hundreds of eager ops
