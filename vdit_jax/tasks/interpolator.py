"""The U-Net frame interpolator as a diffusion task (`config.model.kind = "unet_interpolator"`).

Batch: {"video": float32 [B, L, H, W, C]}: segments of L = `data.num_frames` consecutive frames (the input
pipeline's random temporal crops), pixels in [-1, 1].

Objective (MCVD-style random masks, Voleti et al. 2022): per example a gap g uniform in [1, L - 2] and a start s
uniform in [0, L - g - 2]; the frames s and s + g + 1 are the given keyframes (conditioning channels), and
`diffusion.loss_fn` scores every frame of the segment: the sampler evolves all L frames, so the network is trained to
denoise all of them (the keyframes are copied from the conditioning, the frames between are interpolated, the frames
outside the window extrapolated), as SVD and Wan's image-to-video models score their given frames too. (Scoring
only the frames between leaves the other frames' x_t untrained although the sampler evolves them; on the multistage
config both measured the same at 2,000 steps, README.) So one model fills any gap of 1 .. L - 2 frames. No class
or text condition: the keyframes carry the content, and sampling needs no classifier-free guidance.

    task = tasks.get(config)                                   # config.model.kind == "unet_interpolator"
    frames = task.interpolate(params, first, last, gap, rng)   # first, last uint8 [N, H, W, C] -> [N, gap, H, W, C]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.tree_util import Partial

from vdit_jax import config as config_lib
from vdit_jax import diffusion, tasks
from vdit_jax.models import unet
from vdit_jax.parallel import sharding as sh
from vdit_jax.tasks import dit as dit_task

KIND = "unet_interpolator"


def unet_config(config: ml_collections.ConfigDict) -> unet.UNetConfig:
    """The frozen `UNetConfig` of a config of kind "unet_interpolator" (tuples restored from lists)."""
    m = config.model.to_dict()
    m.pop("kind")
    m["channel_mults"] = tuple(m["channel_mults"])
    m["attention_levels"] = tuple(m["attention_levels"])
    return unet.UNetConfig(**m)


@functools.cache
def _apply_fn(net: unet.UNetConfig):
    """apply(params, x, t, cond) with cond {"given_frames", "frame_mask"}: one function object per config, so the
    samplers' jit cache hits across calls."""
    model = unet.UNet(net)

    def apply(params, x, t, cond):
        return model.apply({"params": params}, x, t, cond["given_frames"], cond["frame_mask"])

    return apply


def gap_masks(rng: jax.Array, batch: int, frames: int) -> tuple[jax.Array, jax.Array]:
    """(keyframes, between), bool [batch, frames] each: per example a gap g uniform in [1, frames - 2] at a start
    s uniform in [0, frames - g - 2]; the keyframes s and s + g + 1 are given, the g frames between them are the
    ones to interpolate."""
    g_rng, s_rng = jax.random.split(rng)
    g = jax.random.randint(g_rng, (batch, 1), 1, frames - 1)
    s = jnp.floor(jax.random.uniform(s_rng, (batch, 1)) * (frames - g - 1)).astype(jnp.int32)
    i = jnp.arange(frames)[None, :]
    given = (i == s) | (i == s + g + 1)
    between = (i > s) & (i < s + g + 1)
    return given, between


def keyframe_segments(first: np.ndarray, last: np.ndarray, gap: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(given_frames float32 [N, frames, H, W, C] in [-1, 1], frame_mask bool [N, frames]) with `first` (uint8
    [N, H, W, C]) at frame 0 and `last` at frame gap + 1."""
    n = len(first)
    given = np.zeros((n, frames, *first.shape[1:]), np.float32)
    given[:, 0] = np.asarray(first, np.float32) / 127.5 - 1.0
    given[:, gap + 1] = np.asarray(last, np.float32) / 127.5 - 1.0
    mask = np.zeros((n, frames), bool)
    mask[:, [0, gap + 1]] = True
    return given, mask


@tasks.register
class InterpolatorTask(tasks.Task):
    """Fills the frames between two keyframes with the U-Net of `config.model` (`vdit_jax.models.unet`)."""

    kind = KIND
    takes_prompts = False

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.net = unet_config(config)
        self.diffusion = config_lib.diffusion_config(config)
        self.sched = self.diffusion.make_schedule()
        self.model = unet.UNet(self.net)

    @classmethod
    def default_model(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dataclasses.asdict(unet.UNetConfig()))

    @property
    def segment_length(self) -> int:
        """L: the frames of a segment; the longest gap it fills is L - 2."""
        return config_lib.input_shape(self.config)[0]

    # ---------------------------------------------------------------- data, parameters, objective

    def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"video": jax.ShapeDtypeStruct((batch_size, *config_lib.input_shape(self.config)), jnp.float32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.ShapeDtypeStruct]) -> Any:
        return unet.init_params(self.net, rng, batch["video"].shape)["params"]

    def prepare_batch(self, batch: tasks.Batch, rng: jax.Array) -> tasks.Batch:
        """Adds "t" int32 [B], "noise" (like video), "frame_mask" bool [B, L] (the keyframes of `gap_masks`) and
        "given_frames" (the video where the mask is True, zeros elsewhere)."""
        t_rng, noise_rng, mask_rng = jax.random.split(rng, 3)
        video = batch["video"]
        out = dict(batch)
        out["t"] = self.diffusion.sample_timesteps(t_rng, video.shape[0])
        out["noise"] = jax.random.normal(noise_rng, video.shape, jnp.float32)
        out["frame_mask"], _ = gap_masks(mask_rng, video.shape[0], video.shape[1])
        out["given_frames"] = video * out["frame_mask"][:, :, None, None, None].astype(video.dtype)
        return out

    def loss(self, params, batch: tasks.Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng

        def model_fn(x_t, t):
            return self.model.apply({"params": params}, x_t, t, batch["given_frames"], batch["frame_mask"])

        per_example, aux = self.diffusion.loss_fn(
            model_fn, self.sched, batch["video"], t=batch["t"], noise=batch["noise"]
        )
        return jnp.mean(per_example), {"mse": jnp.mean(aux["mse"])}

    # ---------------------------------------------------------------- sampling

    def sample(
        self,
        params,
        cond: dict[str, Any],
        rng: jax.Array,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance: float | None = None,
        clip_x0: float | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> np.ndarray:
        """uint8 [N, L, H, W, C] segments (float32 for latents) with the given keyframes kept exactly and the other
        frames generated.

        cond: "given_frames" float [N, L, H, W, C] in [-1, 1] and "frame_mask" bool [N, L] (True = given); other
        keys (labels, captions) are ignored. `guidance` must be None or 1: the interpolator has no null condition.
        Raises ValueError for conditions of another shape or a sampler that does not exist.
        """
        if guidance not in (None, 1, 1.0):
            raise ValueError(f"guidance={guidance}: the interpolator is not guided (it has no null condition); use 1")
        sampler, steps, eta, _, clip_x0 = self.sampler_options(sampler, steps, eta, 1.0, clip_x0)
        shape = config_lib.input_shape(self.config)
        given, frame_mask = cond.get("given_frames"), cond.get("frame_mask")
        if given is None or frame_mask is None:
            raise ValueError("the interpolator needs given_frames [N, L, H, W, C] and frame_mask [N, L] (keyframes)")
        given, frame_mask = np.asarray(given, np.float32), np.asarray(frame_mask)
        if given.ndim != 5 or given.shape[1:] != shape or len(given) == 0:
            raise ValueError(
                f"given_frames must be float [N, L, H, W, C] with (L, H, W, C) = {shape}, got {given.shape}"
            )
        if frame_mask.shape != given.shape[:2] or frame_mask.dtype != bool:
            raise ValueError(f"frame_mask must be bool {given.shape[:2]}, got {frame_mask.dtype} {frame_mask.shape}")
        apply = Partial(_apply_fn(self.net), params)
        out = []
        chunks = range(0, len(given), batch_size)
        for start in tqdm.tqdm(chunks, desc=f"{sampler} x{len(chunks)}", disable=not progress, dynamic_ncols=True):
            rows = slice(start, start + batch_size)
            row_cond = {"given_frames": jnp.asarray(given[rows]), "frame_mask": jnp.asarray(frame_mask[rows])}
            model_fn = diffusion.cfg_model_fn(apply, row_cond, row_cond, 1.0)  # the conditional model alone
            key = jax.random.fold_in(rng, start)
            n = len(given[rows])
            if sampler == "ddim":
                x = diffusion.ddim_sample(
                    model_fn, self.sched, (n, *shape), key, num_steps=steps, eta=eta, clip_x0=clip_x0 or None
                )
            else:
                x = diffusion.ddpm_sample(
                    model_fn,
                    self.sched,
                    (n, *shape),
                    key,
                    variance=self.config.sample.ddpm_variance,
                    clip_x0=clip_x0 or None,
                )
            x = jnp.where(row_cond["frame_mask"][:, :, None, None, None], row_cond["given_frames"], x)
            out.append(dit_task.to_uint8(x) if self.net.in_channels == 3 else np.asarray(x, np.float32))
        return np.concatenate(out)

    def interpolate(self, params, first: np.ndarray, last: np.ndarray, gap: int, rng: jax.Array, **options):
        """The `gap` frames between keyframes `first` and `last` (uint8 [N, H, W, C]): uint8 [N, gap, H, W, C].

        Options as `sample`'s. Raises ValueError for a gap outside [1, L - 2] or keyframes of another shape.
        """
        frames = self.segment_length
        if not 1 <= gap <= frames - 2:
            raise ValueError(
                f"gap={gap} must be in [1, {frames - 2}] (the interpolator's segments have {frames} frames)"
            )
        first, last = np.asarray(first), np.asarray(last)
        want = config_lib.input_shape(self.config)[1:]
        if first.shape != last.shape or first.ndim != 4 or first.shape[1:] != want:
            raise ValueError(
                f"keyframes must be uint8 [N, H, W, C] with (H, W, C) = {want}, got {first.shape} and {last.shape}"
            )
        given, mask = keyframe_segments(first, last, gap, frames)
        return self.sample(params, {"given_frames": given, "frame_mask": mask}, rng, **options)[:, 1 : gap + 1]

    def evaluate(
        self, params, data_dir=None, gaps=None, num: int = 256, seed: int = 0, clips=None, **options
    ) -> dict[int, dict]:
        """PSNR / SSIM (`data.evaluate.frame_quality`) of the frames this model fills between the frames 0 and g + 1
        of `num` test-split clips of `data_dir` (or of `clips`, uint8 [N, >= g + 2, H, W, C]), for each gap g in
        `gaps` (default 1 .. L - 2), next to the two baselines: {g: {"model": {...}, "blend": {...}, "nearest":
        {...}}}. Options as `sample`'s. Raises ValueError for float clips or too few frames."""
        from vdit_jax.data import evaluate, sources

        gaps = list(range(1, self.segment_length - 1)) if gaps is None else [int(g) for g in gaps]
        if clips is None:
            clips, _ = sources.test_clips(self.config, data_dir, num, seed=seed)
        clips = np.asarray(clips)
        if clips.ndim != 5 or clips.shape[1] < max(gaps) + 2:
            raise ValueError(f"clips must be [N, >= {max(gaps) + 2}, H, W, C] for gaps {gaps}, got {clips.shape}")
        if clips.dtype != np.uint8:
            raise ValueError(f"interpolation metrics are for uint8 pixel clips, got {clips.dtype}")
        out = {}
        for g in gaps:
            first, last, truth = clips[:, 0], clips[:, g + 1], clips[:, 1 : g + 1]
            pred = self.interpolate(params, first, last, g, jax.random.key(seed + g), **options)
            out[g] = {
                "model": evaluate.frame_quality(pred, truth),
                "blend": evaluate.frame_quality(evaluate.blend_frames(first, last, g), truth),
                "nearest": evaluate.frame_quality(evaluate.nearest_frames(first, last, g), truth),
            }
        return out

    def sample_conditions(self, data_dir, num: int, seed: int) -> dict[str, Any]:
        """The first and the last frame of the first L frames of `num` test-split clips (the longest gap)."""
        from vdit_jax.data import sources

        clips, captions = sources.test_clips(self.config, data_dir, num, seed=seed)
        frames = self.segment_length
        given, mask = keyframe_segments(clips[:, 0], clips[:, frames - 1], frames - 2, frames)
        return {"given_frames": given, "frame_mask": mask, "captions": captions}

    def denoise_model_fn(self, params, batch: tasks.Batch, cache_text: bool = True) -> tuple[Any, int]:
        """The sampler's model_fn with the batch's first and last frames given (B examples per call; no text)."""
        del cache_text
        video = batch["video"]
        frames = video.shape[1]
        mask = jnp.zeros(video.shape[:2], bool).at[:, 0].set(True).at[:, frames - 1].set(True)
        cond = {"given_frames": video * mask[:, :, None, None, None], "frame_mask": mask}
        return diffusion.cfg_model_fn(Partial(_apply_fn(self.net), params), cond, cond, 1.0), video.shape[0]

    # ---------------------------------------------------------------- checks

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check = config_lib.check
        try:
            net = unet_config(config)
        except (TypeError, ValueError) as e:
            raise config_lib.ConfigError(f"config.model: {e}") from None
        t, h, w, c = config_lib.input_shape(config)
        check(net.in_channels == c, f"config.model.in_channels={net.in_channels} != video channels {c}")
        check(
            t >= 3,
            f"the interpolator's segments (config.data.num_frames) need >= 3 frames (two keyframes and one between), "
            f"got {t}",
        )
        check(
            h % net.downsampling == 0 and w % net.downsampling == 0,
            f"frames of {h}x{w} must be divisible by {net.downsampling} (the U-Net's {len(net.channel_mults)} levels)",
        )

    @classmethod
    def validate_mesh(cls, config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> None:
        config_lib.check(
            mesh_sizes[sh.SEQUENCE] == 1,
            f"the U-Net has no sequence parallelism: mesh axis sequence={mesh_sizes[sh.SEQUENCE]} must be 1",
        )
