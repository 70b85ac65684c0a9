"""Multi-stage generation: a keyframe DiT, then the U-Net interpolator fills the frames between the keyframes.

The keyframe model is a DiT trained on clips subsampled at stride s (`data.frame_stride`): its K frames are the
frames 0, s, 2s, ... of a video of F = (K - 1) s + 1 frames. The interpolator (kind "unet_interpolator", segments of
L >= s + 1 frames) fills each of the K - 1 gaps of s - 1 frames, all gaps of all videos in one batch. Both stages are
jitted sampling loops (`vdit_jax.diffusion`); the keyframes appear unchanged in the output.

    pipe = pipeline.load("runs/keyframes", "runs/interpolator")
    out = pipe.generate(labels, jax.random.key(0))   # out.videos uint8 [N, F, H, W, 3], out.keyframes [N, K, ...]
    out = pipe.generate(None, jax.random.key(0), prompts=["a red square moving up"])  # a text keyframe model

`python -m vdit_jax.sample --pipeline=keyframes+interpolate --workdir=runs/keyframes --interpolator=runs/interpolator`
runs it from the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from vdit_jax import config as config_lib
from vdit_jax import inference, tasks

NAME = "keyframes+interpolate"  # the sample CLI's --pipeline value


@dataclasses.dataclass(frozen=True)
class Output:
    """videos: uint8 [N, F, H, W, 3]; keyframes: uint8 [N, K, H, W, 3] (videos[:, ::stride]); seconds per stage."""

    videos: np.ndarray
    keyframes: np.ndarray
    keyframe_seconds: float
    interpolation_seconds: float


class Pipeline:
    """Keyframes from a DiT, frames between them from the interpolator.

    Raises ValueError (at construction) when the two models do not fit together: the keyframe model must be an RGB
    DiT whose clips are subsampled (`data.frame_stride` s >= 2) and the interpolator must have the same frame size
    and segments of at least s + 1 frames.
    """

    def __init__(
        self,
        keyframe_config: ml_collections.ConfigDict,
        keyframe_params,
        interpolator_config: ml_collections.ConfigDict,
        interpolator_params,
    ):
        self.keyframe_config, self.keyframe_params = keyframe_config, keyframe_params
        self.interpolator_config, self.interpolator_params = interpolator_config, interpolator_params
        self.interpolator = tasks.get(interpolator_config)
        if not hasattr(self.interpolator, "interpolate"):
            raise ValueError(
                f"the interpolation stage must be a frame interpolator (model.kind 'unet_interpolator'), got "
                f"{interpolator_config.model.kind!r}"
            )
        if keyframe_config.model.kind != "dit":
            raise ValueError(f"the keyframe stage must be a DiT (model.kind 'dit'), got {keyframe_config.model.kind!r}")
        self.stride = int(keyframe_config.data.frame_stride)
        k_shape = config_lib.input_shape(keyframe_config)
        i_shape = config_lib.input_shape(interpolator_config)
        if self.stride < 2:
            raise ValueError(
                f"the keyframe model was trained at data.frame_stride={self.stride}: its frames are consecutive, "
                "there is nothing between them to interpolate (train it at a stride >= 2)"
            )
        if k_shape[1:] != i_shape[1:]:
            raise ValueError(f"keyframe frames (H, W, C) = {k_shape[1:]} differ from the interpolator's {i_shape[1:]}")
        if i_shape[0] < self.stride + 1:
            raise ValueError(
                f"the interpolator's segments have {i_shape[0]} frames; gaps of {self.stride - 1} frames between "
                f"keyframes {self.stride} apart need >= {self.stride + 1}"
            )
        self.num_keyframes = k_shape[0]
        self.num_frames = (self.num_keyframes - 1) * self.stride + 1

    def generate(
        self,
        labels: np.ndarray | None,
        rng: jax.Array,
        *,
        prompts: Sequence[str] | None = None,
        text: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        interpolation_steps: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> Output:
        """Videos of F frames, one per label (int [N] of the keyframe model's classes) or, for a text keyframe
        model, one per prompt (free text, built-in text encoder) or text (precomputed embeddings [N, L, D] and
        text_mask [N, L]): `inference.sample`'s conditions.

        sampler, steps, guidance: the keyframe DiT's (default: its config.sample); interpolation_steps: the
        interpolator's DDIM steps (default: its config). Raises ValueError for labels out of range or conditions
        that do not fit the keyframe model (named in the message).
        """
        k_rng, i_rng = jax.random.split(rng)
        t0 = time.perf_counter()
        keyframes = inference.sample(
            self.keyframe_config,
            self.keyframe_params,
            labels,
            k_rng,
            text=text,
            text_mask=text_mask,
            prompts=prompts,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            progress=progress,
        )
        t1 = time.perf_counter()
        n, k = keyframes.shape[:2]
        first = keyframes[:, :-1].reshape(n * (k - 1), *keyframes.shape[2:])
        last = keyframes[:, 1:].reshape(first.shape)
        gap = self.stride - 1
        between = self.interpolator.interpolate(
            self.interpolator_params,
            first,
            last,
            gap,
            i_rng,
            steps=interpolation_steps,
            batch_size=batch_size * (k - 1),
            progress=progress,
        ).reshape(n, k - 1, gap, *keyframes.shape[2:])
        t2 = time.perf_counter()
        videos = np.empty((n, self.num_frames, *keyframes.shape[2:]), np.uint8)
        videos[:, :: self.stride] = keyframes
        for i in range(k - 1):
            videos[:, i * self.stride + 1 : (i + 1) * self.stride] = between[:, i]
        return Output(videos, keyframes, t1 - t0, t2 - t1)


def load(keyframes_workdir, interpolator_workdir, step: int | None = None) -> Pipeline:
    """The pipeline of two training runs' latest checkpoints (`step`: the keyframe run's; the interpolator's is
    always its latest). Raises FileNotFoundError for a missing run, ValueError for runs that do not fit."""
    k_config, k_params, _ = inference.load(keyframes_workdir, step)
    i_config, i_params, _ = inference.load(interpolator_workdir)
    return Pipeline(k_config, k_params, i_config, i_params)
