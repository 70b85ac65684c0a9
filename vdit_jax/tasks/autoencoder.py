"""The causal 3D video autoencoder as a task (`config.model.kind = "video_autoencoder"`), trained by the one trainer.

Batch: {"video": float32 [B, T, H, W, C]} in [-1, 1], T = 1 + r k (r = `model.temporal_compression`). The step's
draw is the posterior sample's noise ("eps", the latent shape); the objective is `models.autoencoder.loss`: L1 + L2
of the reconstruction plus `model.kl_weight` x KL (metrics l1, mse, kl, psnr). Its "samples" are reconstructions
(through the posterior mean) of test-split clips; `evaluate` gives their PSNR / SSIM and the compression ratio.

    task = tasks.get(config)                               # config.model.kind == "video_autoencoder"
    mean, logvar = task.encode(params, video)              # float [N, T, H, W, C] in [-1, 1] -> latents
    video = task.decode(params, mean)                      # -> float [N, T, H, W, C]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from vdit_jax import config as config_lib
from vdit_jax import tasks
from vdit_jax.models import autoencoder as ae
from vdit_jax.parallel import sharding as sh
from vdit_jax.tasks import dit as dit_task

KIND = "video_autoencoder"


def autoencoder_config(config: ml_collections.ConfigDict) -> ae.AutoencoderConfig:
    """The frozen `AutoencoderConfig` of a config of kind "video_autoencoder" (tuples restored from lists)."""
    m = config.model.to_dict()
    m.pop("kind")
    m["channel_mults"] = tuple(m["channel_mults"])
    return ae.AutoencoderConfig(**m)


def to_float(video) -> np.ndarray:
    """uint8 [0, 255] (or float [-1, 1], unchanged) -> float32 [-1, 1]."""
    video = np.asarray(video)
    return video.astype(np.float32) / 127.5 - 1.0 if video.dtype == np.uint8 else video.astype(np.float32)


@tasks.register
class AutoencoderTask(tasks.Task):
    """Trains and runs the causal video autoencoder of `config.model` (`vdit_jax.models.autoencoder`)."""

    kind = KIND
    takes_prompts = False

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.net = autoencoder_config(config)

    @classmethod
    def default_model(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dataclasses.asdict(ae.AutoencoderConfig()))

    def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"video": jax.ShapeDtypeStruct((batch_size, *config_lib.input_shape(self.config)), jnp.float32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.ShapeDtypeStruct]) -> Any:
        return ae.init_params(self.net, rng, batch["video"].shape)["params"]

    def prepare_batch(self, batch: tasks.Batch, rng: jax.Array) -> tasks.Batch:
        """Adds "eps": the posterior sample's N(0, 1) noise, float32 of the latent shape."""
        video = batch["video"]
        return {**batch, "eps": jax.random.normal(rng, self.net.latent_shape(video.shape), jnp.float32)}

    def loss(self, params, batch: tasks.Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        video = nn.with_logical_constraint(batch["video"], (sh.BATCH, None, None, None, None))
        return ae.loss(self.net, params, video, batch["eps"])

    # ---------------------------------------------------------------- encode, decode, reconstruct

    def encode(self, params, video, *, chunk_frames: int | None = None):
        """(mean, logvar) float32 [N, 1 + k, H / s, W / s, C'] of `video` (uint8, or float in [-1, 1])."""
        return ae.encode(self.net, params, to_float(video), chunk_frames=chunk_frames)

    def decode(self, params, latents, *, chunk_latents: int | None = None):
        """Video float32 [N, 1 + r k, s H', s W', C] (~[-1, 1]) of latents [N, 1 + k, H', W', C']."""
        return ae.decode(self.net, params, latents, chunk_latents=chunk_latents)

    def sample(self, params, cond: dict[str, Any], rng: jax.Array, *, batch_size: int = 32, progress=False, **_):
        """Reconstructions uint8 [N, T, H, W, C] of cond["video"] (uint8 or float [-1, 1]) through the posterior mean
        (the sampler options of other tasks do not apply and are ignored). Raises ValueError without "video"."""
        del rng
        if "video" not in cond:
            raise ValueError("the autoencoder reconstructs videos: cond needs 'video' [N, T, H, W, C]")
        video = to_float(cond["video"])
        out = []
        for start in tqdm.tqdm(range(0, len(video), batch_size), disable=not progress, desc="reconstruct"):
            mean, _ = self.encode(params, video[start : start + batch_size])
            out.append(dit_task.to_uint8(self.decode(params, mean)))
        return np.concatenate(out)

    def sample_conditions(self, data_dir, num: int, seed: int) -> dict[str, Any]:
        """`num` test-split clips to reconstruct."""
        from vdit_jax.data import sources

        clips, captions = sources.test_clips(self.config, data_dir, num, seed=seed)
        return {"video": clips, "captions": [f"reconstruction: {c}" for c in captions]}

    def evaluate(self, params, data_dir=None, num: int = 256, seed: int = 0, clips=None) -> dict[str, Any]:
        """PSNR / SSIM (`data.evaluate.frame_quality`) of reconstructions of `num` test-split clips (or `clips`,
        uint8 [N, T, H, W, C]) through the posterior mean, with the compression ratio (pixel values / latent
        values), and "tiled": the same decoded in spatial tiles of half the latent frame's side overlapping by
        half a tile (`autoencoder.tiled_decode`), scored against the clips and against the whole decode."""
        from vdit_jax.data import evaluate, sources

        if clips is None:
            clips, _ = sources.test_clips(self.config, data_dir, num, seed=seed)
        clips = np.asarray(clips)
        latent = self.net.latent_shape(clips.shape)
        whole, tiled = [], []
        tile = max(latent[2] // 2, 1)
        for start in range(0, len(clips), 32):
            mean, _ = self.encode(params, clips[start : start + 32])
            whole.append(dit_task.to_uint8(self.decode(params, mean)))
            tiled.append(dit_task.to_uint8(ae.tiled_decode(self.net, params, mean, tile=tile, overlap=tile // 2)))
        whole, tiled = np.concatenate(whole), np.concatenate(tiled)
        return {
            **evaluate.frame_quality(whole, clips),
            "latent_shape": list(latent[1:]),
            "compression": float(np.prod(clips.shape[1:]) / np.prod(latent[1:])),
            "tiled": {
                "tile_latent_px": tile,
                **evaluate.frame_quality(tiled, clips),
                "psnr_vs_whole": evaluate.frame_quality(tiled, whole)["psnr"],
            },
        }

    # ---------------------------------------------------------------- checks

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check = config_lib.check
        try:
            net = autoencoder_config(config)
        except (TypeError, ValueError) as e:
            raise config_lib.ConfigError(f"config.model: {e}") from None
        t, h, w, c = config_lib.input_shape(config)
        check(net.in_channels == c, f"config.model.in_channels={net.in_channels} != video channels {c}")
        try:
            ae.check_frames(t, net.temporal_compression)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.data (num_frames / video_shape): {e}") from None
        s = net.spatial_compression
        check(h % s == 0 and w % s == 0, f"frames of {h}x{w} must be divisible by spatial_compression={s}")

    @classmethod
    def validate_mesh(cls, config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> None:
        config_lib.check(
            mesh_sizes[sh.SEQUENCE] == 1,
            f"the autoencoder has no sequence parallelism: mesh axis sequence={mesh_sizes[sh.SEQUENCE]} must be 1",
        )
