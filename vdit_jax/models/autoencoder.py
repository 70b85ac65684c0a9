"""A causal 3D video autoencoder with a KL bottleneck: the VAE that latent video DiTs work in (the design of
CogVideoX's and Wan's VAEs: Yang et al. 2024, "CogVideoX"; Wan team 2025, "Wan: Open and Advanced Large-Scale Video
Generative Models"), convolutional, in Flax Linen.

Shapes. A video [B, T, H, W, C] in [-1, 1] with T = 1 + r k frames (r = `temporal_compression`) encodes to latents
[B, 1 + k, H / s, W / s, latent_channels] (s = `spatial_compression`): the first frame is encoded alone, so an image
(T = 1) and a video share one latent space, and every later latent frame covers r frames. Other frame counts are
refused (`check_frames`: one message naming the count and the nearest valid ones; `pad_frames` repeats the last
frame up to the next valid count when the caller wants that), never silently cut.

Causality. Every temporal convolution is causal (padded with k_t - 1 zero frames in front), temporal downsampling
keeps the outputs at even frame positions (latent j sees frames <= r j), and normalisation is an RMSNorm over the
channels of each pixel of each frame: nothing mixes information backwards in time (GroupNorm over time would: a
known bug of HunyuanVideo's VAE), so changing frame k changes no latent frame before ceil(k / r) (tested).

Chunks. Because of that, a video can be encoded (decoded) a few frames at a time (`encode(..., chunk_frames=n)`):
each causal convolution keeps the last k_t - 1 frames it saw in a `cache` variable collection (as Wan's VAE keeps
`feat_cache`), and the chunks' latents concatenate to the whole video's to float tolerance (tested), with the
memory of one chunk. The first chunk is the first frame alone; the others hold a multiple of r frames.

Tiles. `tiled_encode` / `tiled_decode` split H and W into overlapping tiles and blend the overlaps with linear ramps
whose width is the overlap measured in the *output's* units (`blend_tiles`; FastVideo once measured it in pixels
and applied it in latents): large frames fit, at a small error at the seams (measured in the tests).

    cfg = AutoencoderConfig(spatial_compression=4, temporal_compression=4, latent_channels=4)
    params = init_params(cfg, jax.random.key(0), (1, 17, 64, 64, 3))["params"]
    mean, logvar = encode(cfg, params, video)                  # [1, 5, 16, 16, 4] each
    video_hat = decode(cfg, params, mean)                      # [1, 17, 64, 64, 3]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.parallel import sharding as sh

SPATIAL = (1, 2, 4, 8, 16)
TEMPORAL = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The network and its objective's weights.

    spatial_compression s in SPATIAL, temporal_compression r in TEMPORAL. The input is first cut into `spatial_patch`
    p x p pixel patches (space-to-depth, as Wan 2.2's VAE does: no convolution runs at full resolution), then
    log2(s / p) stages halve H and W and log2 r stages halve T (the first ones do both); `channel_mults` gives one
    width multiplier of `base_channels` per level, stages + 1 of them. `kl_weight` weighs the KL term of the
    training objective (`loss`) against the reconstruction's L1 + L2. Raises ValueError for a value out of range.
    """

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    spatial_patch: int = 1
    spatial_compression: int = 4
    temporal_compression: int = 4
    kl_weight: float = 1e-6
    factorized: bool = True  # (2+1)D convolutions in the ResBlocks (3x3 per frame, then 3 over time); else 3x3x3
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.spatial_compression not in SPATIAL:
            raise ValueError(f"spatial_compression={self.spatial_compression} must be one of {SPATIAL}")
        if self.temporal_compression not in TEMPORAL:
            raise ValueError(f"temporal_compression={self.temporal_compression} must be one of {TEMPORAL}")
        if self.spatial_patch not in SPATIAL or self.spatial_compression % self.spatial_patch:
            raise ValueError(
                f"spatial_patch={self.spatial_patch} must be one of {SPATIAL} dividing spatial_compression="
                f"{self.spatial_compression}"
            )
        if len(self.channel_mults) != self.stages + 1:
            raise ValueError(
                f"channel_mults={tuple(self.channel_mults)} must have {self.stages + 1} entries: one per level, "
                f"{self.stages} downsampling stages (log2 of spatial_compression / spatial_patch = "
                f"{self.spatial_levels}, log2 of temporal_compression = {self.temporal_levels}), plus one"
            )
        for key in ("in_channels", "latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight={self.kl_weight} must be >= 0")

    @property
    def spatial_levels(self) -> int:
        """Stages that halve H and W (after the patches)."""
        return int(math.log2(self.spatial_compression // self.spatial_patch))

    @property
    def stages(self) -> int:
        return max(self.spatial_levels, self.temporal_levels)

    @property
    def temporal_levels(self) -> int:
        return int(math.log2(self.temporal_compression))

    def latent_shape(self, video_shape) -> tuple[int, ...]:
        """[B, T, H, W, C] -> [B, 1 + (T - 1) / r, H / s, W / s, latent_channels] (checks the frames)."""
        b, t, h, w, _ = video_shape
        check_frames(t, self.temporal_compression)
        s = self.spatial_compression
        return (b, 1 + (t - 1) // self.temporal_compression, h // s, w // s, self.latent_channels)


def check_frames(frames: int, r: int) -> None:
    """Raises ValueError unless frames = 1 + r k (k >= 0), naming the nearest valid counts."""
    if frames < 1 or (frames - 1) % r:
        below = 1 + max(frames - 1, 0) // r * r
        raise ValueError(
            f"{frames} frames cannot be encoded with temporal compression {r}: it needs 1 + {r}k frames (the first "
            f"frame alone, then groups of {r}), e.g. {below} or {below + r}; pad (autoencoder.pad_frames) or cut "
            "the video to one of those"
        )


def pad_frames(video: np.ndarray | jax.Array, r: int):
    """`video` [B, T, H, W, C] with its last frame repeated up to the next 1 + r k frames (unchanged if valid)."""
    t = video.shape[1]
    want = 1 + -(-(t - 1) // r) * r
    if want == t:
        return video
    pad = jnp.repeat(video[:, -1:], want - t, axis=1)
    return jnp.concatenate([jnp.asarray(video), pad], axis=1)


# ---------------------------------------------------------------- layers


class CausalConv3d(nn.Module):
    """A 3D convolution, causal in time: k_t - 1 zero frames in front (or, when the `cache` collection is mutable,
    the last k_t - 1 input frames of the previous chunk, zeros for the first). x: [B, T, H, W, C_in] ->
    [B, T, H / stride, W / stride, features]. Kernel [k_t, k_h, k_w, in, out] squeezed of its unit axes (a spatial
    kernel [k_h, k_w, in, out] runs as a 2D convolution over the frames, a temporal one [k_t, in, out] as a 1D
    convolution over the pixels: XLA's CPU convolutions are many times faster in 2D than in 3D), with logical axes
    (..., in, out)."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    stride: int = 1
    axes: tuple[Any, Any] = (None, sh.EMBED)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel
        if kt > 1:
            if self.is_mutable_collection("cache"):
                past = self.variable("cache", "past", jnp.zeros, (x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
                x = jnp.concatenate([past.value, x], axis=1)
                past.value = x[:, -(kt - 1) :]
            else:
                x = jnp.pad(x, ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)))
        b, t, h, w, c = x.shape
        if kt == 1:  # per frame: frames folded into the batch
            kernel, strides, pad, x = (
                (kh, kw),
                (self.stride,) * 2,
                ((kh // 2,) * 2, (kw // 2,) * 2),
                x.reshape(-1, h, w, c),
            )
        elif kh == kw == 1 and self.stride == 1:  # over time only: pixels folded into the batch
            kernel, strides, pad = (kt,), (1,), ((0, 0),)
            x = x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
        else:
            kernel, strides, pad = self.kernel, (1, self.stride, self.stride), ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2)
        y = nn.Conv(
            self.features,
            kernel,
            strides=strides,
            padding=pad,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None,) * len(kernel) + tuple(self.axes)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
            name="conv",
        )(x)
        if kt == 1:
            return y.reshape(b, t, *y.shape[1:])
        if len(kernel) == 1:
            return y.reshape(b, h, w, -1, self.features).transpose(0, 3, 1, 2, 4)
        return y


def _norm(name: str, dtype, param_dtype) -> nn.RMSNorm:
    """RMSNorm over the channels of each pixel of each frame: causal and tile-local."""
    return nn.RMSNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.EMBED,)),
        name=name,
    )


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus the input (a 1x1x1 conv when the width changes). The convolutions
    are 3x3x3, or with `factorized` (2+1)D (Tran et al. 2018, "A Closer Look at Spatiotemporal Convolutions"): 3x3
    per frame, then 3 over time, about a third of the cost for the same receptive field."""

    features: int
    factorized: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _conv(self, h, name: str, **kw):
        if not self.factorized:
            return CausalConv3d(self.features, name=name, **kw)(h)
        h = CausalConv3d(self.features, (1, 3, 3), name=f"{name}_space", **kw)(h)
        return CausalConv3d(self.features, (3, 1, 1), name=f"{name}_time", **kw)(h)

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = self._conv(nn.silu(_norm("norm1", **kw)(x)), "conv1", **kw)
        h = self._conv(nn.silu(_norm("norm2", **kw)(h)), "conv2", **kw)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, (1, 1, 1), name="skip", **kw)(x)
        return x + h


class Downsample(nn.Module):
    """With `space`, halves H and W (a stride-2 3x3 conv per frame); with `time`, T: a causal 3x1x1 conv whose
    outputs at even global frame positions are kept (frame 0 alone, then one per pair). `first`: the chunk starts at
    frame 0 (else at an odd frame, as every later chunk does)."""

    features: int
    space: bool
    time: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.space:
            x = CausalConv3d(self.features, (1, 3, 3), stride=2, axes=(None, sh.EMBED), name="space", **kw)(x)
        if self.time:
            x = CausalConv3d(self.features, (3, 1, 1), axes=(None, sh.EMBED), name="time", **kw)(x)
            x = x[:, 0::2] if first else x[:, 1::2]
        return x


class Upsample(nn.Module):
    """Doubles T (with `time`: a causal 3x1x1 conv to 2C channels, each latent frame becoming two; the first
    chunk's first frame drops the earlier of its two, so 1 + k -> 1 + 2k) and H, W (with `space`: nearest, then a
    3x3 conv)."""

    features: int
    space: bool
    time: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.time:
            b, t, h, w, c = x.shape
            x = CausalConv3d(2 * c, (3, 1, 1), axes=(None, sh.EMBED), name="time", **kw)(x)
            x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            if first:
                x = x[:, 1:]
        if self.space:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = CausalConv3d(self.features, (1, 3, 3), axes=(None, sh.EMBED), name="space", **kw)(x)
        return x


class Encoder(nn.Module):
    """Video [B, T, H, W, C] -> (mean, logvar) [B, 1 + (T - 1) / r, H / s, W / s, latent_channels] each."""

    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, x, first: bool = True):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        rb = dict(factorized=cfg.factorized, **kw)
        p = cfg.spatial_patch
        x = einops.rearrange(x.astype(kw["dtype"]), "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)
        h = CausalConv3d(cfg.base_channels, (1, 3, 3), name="conv_in", **kw)(x)
        for level, mult in enumerate(cfg.channel_mults):
            for i in range(cfg.num_res_blocks):
                h = ResBlock(cfg.base_channels * mult, name=f"down{level}_res{i}", **rb)(h)
            if level < cfg.stages:
                space, time = level < cfg.spatial_levels, level < cfg.temporal_levels
                h = Downsample(h.shape[-1], space, time, name=f"down{level}_sample", **kw)(h, first)
        h = ResBlock(h.shape[-1], name="mid_res", **rb)(h)
        h = nn.silu(_norm("norm_out", **kw)(h))
        moments = CausalConv3d(2 * cfg.latent_channels, axes=(sh.EMBED, None), name="conv_out", **kw)(h)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    """Latents [B, 1 + k, H', W', latent_channels] -> video [B, 1 + r k, s H', s W', C] (unbounded; ~[-1, 1])."""

    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, z, first: bool = True):
        cfg = self.cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        rb = dict(factorized=cfg.factorized, **kw)
        width = cfg.base_channels * cfg.channel_mults[-1]
        h = CausalConv3d(width, axes=(None, sh.EMBED), name="conv_in", **kw)(z.astype(kw["dtype"]))
        h = ResBlock(width, name="mid_res", **rb)(h)
        for level in reversed(range(len(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                h = ResBlock(cfg.base_channels * cfg.channel_mults[level], name=f"up{level}_res{i}", **rb)(h)
            if level > 0:
                space, time = level - 1 < cfg.spatial_levels, level - 1 < cfg.temporal_levels
                h = Upsample(h.shape[-1], space, time, name=f"up{level}_sample", **kw)(h, first)
        h = nn.silu(_norm("norm_out", **kw)(h))
        p = cfg.spatial_patch
        out = CausalConv3d(cfg.in_channels * p * p, (1, 3, 3), axes=(sh.EMBED, None), name="conv_out", **kw)(h)
        out = einops.rearrange(out, "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p)
        return out.astype(jnp.float32)


class Autoencoder(nn.Module):
    """`encode` / `decode` / `__call__` (a reconstruction through the posterior's sample, for training)."""

    cfg: AutoencoderConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x, first: bool = True):
        return self.encoder(x, first)

    def decode(self, z, first: bool = True):
        return self.decoder(z, first)

    def __call__(self, x, eps):
        """x [B, T, H, W, C], eps ~ N(0, 1) of the latent shape -> (reconstruction, mean, logvar)."""
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * eps
        return self.decoder(z), mean, logvar


def init_params(cfg: AutoencoderConfig, rng: jax.Array, video_shape: tuple[int, ...]):
    """Boxed (logically annotated) variables {"params": ...} for videos of `video_shape` [B, T, H, W, C]."""
    check_frames(video_shape[1], cfg.temporal_compression)

    def init(rng):
        x = jnp.zeros(video_shape, jnp.float32)
        eps = jnp.zeros(cfg.latent_shape(video_shape), jnp.float32)
        return Autoencoder(cfg).init(rng, x, eps)

    return jax.jit(init)(rng)


def loss(cfg: AutoencoderConfig, params, video, eps) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective: L1 + L2 of the reconstruction (through the posterior's sample z = mean + std eps) plus
    `kl_weight` times the KL divergence to N(0, I) (summed over a latent's elements, averaged over the video's
    pixels so the weight does not depend on the resolution). video [B, T, H, W, C] in [-1, 1]; eps [latent shape].
    Returns (loss [], {"l1", "mse", "kl", "psnr"}); psnr in dB on [-1, 1] pixels (peak-to-peak 2)."""
    recon, mean, logvar = Autoencoder(cfg).apply({"params": params}, video, eps)
    err = recon - video
    l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(err**2)
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar) / video.size
    psnr = 10 * jnp.log10(4.0 / jnp.maximum(jnp.mean(err**2, axis=(1, 2, 3, 4)), 1e-10))
    return l1 + mse + cfg.kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl, "psnr": jnp.mean(psnr)}


# ---------------------------------------------------------------- encode / decode, whole or in chunks


@functools.partial(jax.jit, static_argnames=("cfg", "method", "first"))
def _apply(cfg, params, x, cache, method: str, first: bool):
    """One whole call (cache None) or one chunk (cache: the previous chunk's, {} for the first)."""
    model = Autoencoder(cfg)
    if cache is None:
        return model.apply({"params": params}, x, first, method=method), None
    variables = {"params": params, **({"cache": cache} if cache else {})}
    out, mutated = model.apply(variables, x, first, method=method, mutable=["cache"])
    return out, mutated["cache"]


def _chunks(total: int, first_len: int, size: int) -> list[tuple[int, int]]:
    bounds, start = [(0, first_len)], first_len
    while start < total:
        bounds.append((start, min(start + size, total)))
        start += size
    return bounds


def encode(cfg: AutoencoderConfig, params, video, *, chunk_frames: int | None = None):
    """(mean, logvar) of `video` [B, T, H, W, C] in [-1, 1], T = 1 + r k: [B, 1 + k, H / s, W / s, C_latent] each.

    chunk_frames: None encodes the video in one call; n (a multiple of r) encodes the first frame, then n frames at
    a time, carrying the causal convolutions' caches (the same latents to float tolerance; one chunk's memory).
    Raises ValueError for a frame count that is not 1 + r k or a chunk that is not a multiple of r."""
    r = cfg.temporal_compression
    check_frames(video.shape[1], r)
    video = jnp.asarray(video, jnp.float32)
    if chunk_frames is None:
        return _apply(cfg, params, video, None, "encode", True)[0]
    if chunk_frames < r or chunk_frames % r:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of the temporal compression {r}")
    cache, means, logvars = {}, [], []
    for i, (a, b) in enumerate(_chunks(video.shape[1], 1, chunk_frames)):
        (mean, logvar), cache = _apply(cfg, params, video[:, a:b], cache, "encode", i == 0)
        means.append(mean)
        logvars.append(logvar)
    return jnp.concatenate(means, 1), jnp.concatenate(logvars, 1)


def decode(cfg: AutoencoderConfig, params, latents, *, chunk_latents: int | None = None):
    """Video [B, 1 + r k, s H', s W', C] (float, ~[-1, 1]) of latents [B, 1 + k, H', W', C_latent].

    chunk_latents: None decodes in one call; n decodes the first latent frame, then n at a time with the causal
    caches (the same video to float tolerance). Raises ValueError for n < 1."""
    latents = jnp.asarray(latents, jnp.float32)
    if chunk_latents is None:
        return _apply(cfg, params, latents, None, "decode", True)[0]
    if chunk_latents < 1:
        raise ValueError(f"chunk_latents={chunk_latents} must be >= 1")
    cache, out = {}, []
    for i, (a, b) in enumerate(_chunks(latents.shape[1], 1, chunk_latents)):
        video, cache = _apply(cfg, params, latents[:, a:b], cache, "decode", i == 0)
        out.append(video)
    return jnp.concatenate(out, 1)


# ---------------------------------------------------------------- spatial tiles


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Blend weights [n] of a tile: rising over its first `overlap` positions (unless it starts the frame) and
    falling over its last `overlap` (unless it ends it); strictly positive."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if not at_start:
            w[:overlap] = np.minimum(w[:overlap], ramp)
        if not at_end:
            w[n - overlap :] = np.minimum(w[n - overlap :], ramp[::-1])
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_tiles(fn: Callable, x, tile: int, overlap: int, factor: float):
    """fn applied to overlapping spatial tiles of x [B, T, H, W, C] and blended: tiles of `tile` x `tile` input
    pixels every `tile - overlap`, fn mapping a tile to one `factor` times its size (decode: s; encode: 1 / s),
    overlaps blended with linear ramps `overlap * factor` output pixels wide, the overlap in the output's units.
    Raises ValueError for an overlap not in [0, tile) or one that does not map to whole output pixels."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
    out_overlap = overlap * factor
    if out_overlap != int(out_overlap) or tile * factor != int(tile * factor):
        raise ValueError(f"tile={tile} and overlap={overlap} must map to whole pixels at factor {factor}")
    out_overlap = int(out_overlap)
    _, _, h, w, _ = x.shape
    hs, ws = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    total = weight = None
    for i in hs:
        for j in ws:
            y = fn(x[:, :, i : i + tile, j : j + tile])
            th, tw = y.shape[2], y.shape[3]
            if total is None:
                oh, ow = int(h * factor), int(w * factor)
                total = jnp.zeros((*y.shape[:2], oh, ow, y.shape[-1]), jnp.float32)
                weight = jnp.zeros((oh, ow), jnp.float32)
            wy = _ramp(th, min(out_overlap, th), i == 0, i == hs[-1])
            wx = _ramp(tw, min(out_overlap, tw), j == 0, j == ws[-1])
            wt = jnp.asarray(wy[:, None] * wx[None, :])
            oi, oj = int(i * factor), int(j * factor)
            total = total.at[:, :, oi : oi + th, oj : oj + tw].add(y * wt[None, None, :, :, None])
            weight = weight.at[oi : oi + th, oj : oj + tw].add(wt)
    return total / weight[None, None, :, :, None]


def tiled_encode(cfg: AutoencoderConfig, params, video, *, tile: int, overlap: int):
    """The posterior mean of `video` encoded in overlapping spatial tiles (`blend_tiles`; tile and overlap in
    pixels, multiples of the spatial compression): [B, 1 + k, H / s, W / s, C_latent]."""
    s = cfg.spatial_compression
    if tile % s or overlap % s:
        raise ValueError(f"tile={tile} and overlap={overlap} must be multiples of spatial_compression={s}")
    return blend_tiles(lambda v: encode(cfg, params, v)[0], video, tile, overlap, 1 / s)


def tiled_decode(cfg: AutoencoderConfig, params, latents, *, tile: int, overlap: int):
    """`latents` decoded in overlapping spatial tiles (`blend_tiles`; tile and overlap in latent pixels):
    [B, 1 + r k, s H', s W', C]."""
    return blend_tiles(lambda z: decode(cfg, params, z), latents, tile, overlap, cfg.spatial_compression)
