"""The spacetime DiT as a diffusion denoiser of videos (`config.model.kind = "dit"`).

Batch: {"video": float32 [B, T, H, W, C] (pixels in [-1, 1] or latents), "label": int32 [B], and for text models
(`model.text_dim > 0`) "text": float32 [B, L, text_dim] precomputed embeddings, or "tokens": int32 [B, L] for the
built-in text encoder (`model.text_vocab`), with "text_mask": bool [B, L] (True = a real token; optional in a batch
given to the step)}.

Objective: `diffusion.loss_fn` on the video with timesteps and noise drawn per example, labels and texts replaced
by the null condition at `diffusion.label_dropout` (classifier-free guidance), self-conditioning (Chen et al. 2022)
when the model has it.
"""

from __future__ import annotations

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
from vdit_jax.models import dit
from vdit_jax.parallel import sharding as sh


@functools.cache
def _apply_fn(model_cfg: dit.DiTConfig):
    """One function object per model config, so jit caches hit across calls; `cond` is a dict of the conditioning
    the model takes ("label", "text", "text_mask", "given_frames", "frame_mask")."""
    model = dit.DiT(model_cfg)

    def apply(params, x, t, cond, x0_prev=None):  # x0_prev: the samplers' self-conditioning estimate
        return model.apply(
            {"params": params},
            x,
            t,
            cond.get("label"),
            cond.get("text"),
            x0_prev,
            cond.get("text_mask"),
            cond.get("given_frames"),
            cond.get("frame_mask"),
            cond.get("text_cache"),
        )

    return apply


@functools.cache
def _text_cache_fn(model_cfg: dit.DiTConfig):
    """jit (params, text, text_mask) -> the model's text cache (`DiT._text_cache`), one per config."""
    model = dit.DiT(model_cfg)
    return jax.jit(lambda params, text, mask: model.apply({"params": params}, None, None, text=text, text_mask=mask))


def to_uint8(videos: jax.Array) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.asarray(jnp.clip(jnp.round((videos + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


@tasks.register
class DiTTask(tasks.Task):
    """Class-, text- or un-conditional video diffusion with the DiT of `config.model`."""

    kind = "dit"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.net = config_lib.model_config(config)
        self.diffusion = config_lib.diffusion_config(config)
        self.sched = self.diffusion.make_schedule()
        self.model = dit.DiT(self.net)
        # The batch / condition key of the text: built-in encoder tokens or precomputed embeddings.
        self.text_key = "tokens" if self.net.text_vocab else "text"

    def null_text(self, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
        """The one null condition of classifier-free guidance, shared by caption dropout and sampling
        (`dit.null_text`): the empty prompt's tokens for the built-in encoder, zero embeddings otherwise."""
        return dit.null_text(batch, length, self.net.text_dim, builtin=bool(self.net.text_vocab))

    # ---------------------------------------------------------------- data and parameters

    @classmethod
    def default_model(cls) -> ml_collections.ConfigDict:
        return config_lib.default_dit_model()

    def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        out = {
            "video": jax.ShapeDtypeStruct((batch_size, *config_lib.input_shape(self.config)), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }
        if self.net.text_dim:
            length = self.config.data.text_len
            if self.net.text_vocab:
                out["tokens"] = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
            else:
                out["text"] = jax.ShapeDtypeStruct((batch_size, length, self.net.text_dim), jnp.float32)
            out["text_mask"] = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
        return out

    def init(self, rng: jax.Array, batch: dict[str, jax.ShapeDtypeStruct]) -> Any:
        return dit.init_params(self.net, rng, batch["video"].shape)["params"]

    # ---------------------------------------------------------------- the objective

    def prepare_batch(self, batch: tasks.Batch, rng: jax.Array) -> tasks.Batch:
        """Adds "t" int32 [B] and "noise" (like video); drops labels / texts to the null condition."""
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        video = batch["video"]
        out = dict(batch)
        out["t"] = self.diffusion.sample_timesteps(t_rng, video.shape[0])
        out["noise"] = jax.random.normal(noise_rng, video.shape, jnp.float32)
        rate = self.diffusion.cond_dropout
        if self.net.num_classes:
            out["label"] = dit.drop_labels(drop_rng, batch["label"], rate, self.net.num_classes)
        if self.net.text_dim:
            key = self.text_key
            text, mask = dit.drop_text(jax.random.fold_in(drop_rng, 1), batch[key], rate, batch.get("text_mask"))
            out[key], out["text_mask"] = text, mask
        if self.net.frame_conditioning:
            out["frame_mask"] = self.draw_frame_masks(jax.random.fold_in(drop_rng, 3), video.shape[0], video.shape[1])
            out["given_frames"] = video * out["frame_mask"][:, :, None, None, None].astype(video.dtype)
        return out

    def draw_frame_masks(self, rng: jax.Array, batch: int, frames: int) -> jax.Array:
        """bool [batch, frames]: per example nothing, the first frame, the first k, or the first and the last, at
        the rates of `config.frames` (k uniform in [2, max_prefix], max_prefix 0 = max(T // 2, 2), at most T - 1)."""
        f = self.config.frames
        mode_rng, k_rng = jax.random.split(rng)
        probs = jnp.array([f.rate_none, f.rate_first, f.rate_prefix, f.rate_first_last], jnp.float32)
        mode = jax.random.choice(mode_rng, 4, (batch,), p=probs)
        max_prefix = min(f.max_prefix or max(frames // 2, 2), frames - 1)  # a frame is always left to generate
        k = jax.random.randint(k_rng, (batch,), min(2, max_prefix), max_prefix + 1)
        i = jnp.arange(frames)[None, :]
        mode = mode[:, None]
        first = i == 0
        return ((mode == 1) & first) | ((mode == 2) & (i < k[:, None])) | ((mode == 3) & (first | (i == frames - 1)))

    def loss(self, params, batch: tasks.Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        y = batch["label"] if self.net.num_classes else None
        text = batch[self.text_key] if self.net.text_dim else None
        text_mask = batch.get("text_mask") if self.net.text_dim else None
        # Frame conditioning: the given frames enter as channels; the loss scores every frame, the given ones too
        # (SVD / Wan practice): the sampler evolves all frames, so the network must denoise the given ones as well
        # (for them, copying the conditioning).
        given, frame_mask = batch.get("given_frames"), batch.get("frame_mask")

        def apply(x_t, t, x0):
            return self.model.apply({"params": params}, x_t, t, y, text, x0, text_mask, given, frame_mask)

        if self.net.self_condition:
            # One self-conditioning draw per step (the same for every micro-batch of an accumulated step).
            self_cond_rng = jax.random.fold_in(jax.random.split(rng, 3)[2], 2)
            model_fn = diffusion.self_conditioned(apply, self.sched, self_cond_rng)
        else:
            model_fn = lambda x_t, t: apply(x_t, t, None)
        per_example, aux = self.diffusion.loss_fn(
            model_fn, self.sched, batch["video"], t=batch["t"], noise=batch["noise"]
        )
        return jnp.mean(per_example), {"mse": jnp.mean(aux["mse"])}

    # ---------------------------------------------------------------- sampling

    def sample_conditions(self, data_dir, num: int, seed: int) -> dict[str, Any]:
        from vdit_jax.data import sources

        cond = sources.sample_conditions(self.config, data_dir, num, seed=seed)
        out = {"label": cond["labels"], "captions": cond["captions"]}
        if self.text_key in cond:
            out[self.text_key], out["text_mask"] = cond[self.text_key], cond["text_mask"]
        return out

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
        """N videos, one per row of `cond` (see `inference.sample`, which documents every argument). With
        "given_frames" (float [N, T, H, W, C], the model's input space) and "frame_mask" (bool [N, T]) in `cond`, a
        frame-conditioned model generates the other frames and the output holds the given ones exactly."""
        sampler, steps, eta, guidance, clip_x0 = self.sampler_options(sampler, steps, eta, guidance, clip_x0)
        net = self.net
        labels, text, text_mask = cond.get("label"), cond.get(self.text_key), cond.get("text_mask")
        if net.text_vocab:
            if text is None:
                raise ValueError(
                    "this model has the built-in text encoder (model.text_vocab): pass tokens int32 [N, L] (and "
                    "text_mask [N, L]), e.g. from data.sources.encode_prompts"
                )
            text = np.asarray(text)
            if text.ndim != 2 or not np.issubdtype(text.dtype, np.integer) or len(text) == 0:
                raise ValueError(f"tokens must be int [N, L] with N >= 1, got {text.dtype} {text.shape}")
            if text.shape[1] > net.text_max_len:
                raise ValueError(f"tokens have length {text.shape[1]}, more than model.text_max_len {net.text_max_len}")
            text = text.astype(np.int32)
        elif net.text_dim:
            if text is None:
                raise ValueError(
                    f"this model is text-conditional (model.text_dim={net.text_dim}): pass text [N, L, "
                    f"{net.text_dim}] (and text_mask [N, L]), e.g. from data.sources.sample_conditions"
                )
            text = np.asarray(text, np.float32)
            if text.ndim != 3 or text.shape[2] != net.text_dim or len(text) == 0:
                raise ValueError(f"text must be float [N, L, {net.text_dim}] with N >= 1, got {text.shape}")
        if net.text_dim:
            if text_mask is None:  # tokens: the padding is masked; embeddings: all real
                text_mask = text != 0 if net.text_vocab else np.ones(text.shape[:2], bool)
            text_mask = np.asarray(text_mask)
            if text_mask.shape != text.shape[:2] or text_mask.dtype != bool:
                raise ValueError(f"text_mask must be bool {text.shape[:2]}, got {text_mask.dtype} {text_mask.shape}")
            labels = np.zeros((len(text),), np.int32) if labels is None else labels
        if labels is None:
            raise ValueError("no labels given: pass one label per video to sample")
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.size == 0:
            raise ValueError("no labels given: pass one label per video to sample")
        if net.num_classes and (labels.min(initial=0) < 0 or labels.max(initial=0) >= net.num_classes):
            raise ValueError(f"labels must be in [0, {net.num_classes}), got {labels.tolist()}")
        if net.text_dim and len(labels) != len(text):
            raise ValueError(f"got {len(labels)} labels but {len(text)} texts: give one of each per video")
        shape = config_lib.input_shape(self.config)
        given, frame_mask = cond.get("given_frames"), cond.get("frame_mask")
        if (given is None) != (frame_mask is None):
            raise ValueError("pass given_frames and frame_mask together (or neither)")
        if given is not None:
            if not net.frame_conditioning:
                raise ValueError("this model has no frame conditioning (model.frame_conditioning=False)")
            given, frame_mask = np.asarray(given, np.float32), np.asarray(frame_mask)
            if given.shape != (len(labels), *shape):
                raise ValueError(
                    f"given_frames must be float [N, T, H, W, C] = {(len(labels), *shape)}, got {given.shape}"
                )
            if frame_mask.shape != given.shape[:2] or frame_mask.dtype != bool:
                raise ValueError(
                    f"frame_mask must be bool {given.shape[:2]}, got {frame_mask.dtype} {frame_mask.shape}"
                )
        apply = Partial(_apply_fn(net), params)
        null = {}
        if net.num_classes:
            null["label"] = jnp.full((1,), net.num_classes, jnp.int32)
        if net.text_dim:  # the text's share of the forward, once per loop (the null's once per call)
            null["text_cache"] = _text_cache_fn(net)(params, *self.null_text(1, text.shape[1]))
        guided = float(guidance) if null else 1.0  # an unconditional model has nothing to guide
        out = []
        chunks = range(0, len(labels), batch_size)
        for start in tqdm.tqdm(chunks, desc=f"{sampler} x{len(chunks)}", disable=not progress, dynamic_ncols=True):
            rows = slice(start, start + batch_size)
            n = len(labels[rows])
            row_cond = {}
            if net.num_classes:
                row_cond["label"] = jnp.asarray(labels[rows])
            if net.text_dim:
                row_cond["text_cache"] = _text_cache_fn(net)(
                    params, jnp.asarray(text[rows]), jnp.asarray(text_mask[rows])
                )
            row_null = dict(null)
            if given is not None:  # the given frames are not guided: both branches see them
                frames = {"given_frames": jnp.asarray(given[rows]), "frame_mask": jnp.asarray(frame_mask[rows])}
                row_cond.update(frames)
                row_null.update(frames)
            model_fn = diffusion.cfg_model_fn(apply, row_cond, row_null, guided)
            key = jax.random.fold_in(rng, start)
            kw = dict(clip_x0=clip_x0 or None, self_condition=net.self_condition)
            if sampler == "ddim":
                x = diffusion.ddim_sample(model_fn, self.sched, (n, *shape), key, num_steps=steps, eta=eta, **kw)
            else:
                x = diffusion.ddpm_sample(
                    model_fn, self.sched, (n, *shape), key, variance=self.config.sample.ddpm_variance, **kw
                )
            if given is not None:  # the given frames, exactly
                x = jnp.where(jnp.asarray(frame_mask[rows])[:, :, None, None, None], jnp.asarray(given[rows]), x)
            if self.config.latent.autoencoder:  # a latent model: pixels, decoded by its autoencoder
                from vdit_jax.data import latents

                out.append(latents.decode(self.config, x))
            else:
                out.append(to_uint8(x) if net.in_channels == 3 else np.asarray(x, np.float32))
        return np.concatenate(out)

    # ---------------------------------------------------------------- costs (the benchmark)

    def denoise_model_fn(self, params, batch: tasks.Batch, cache_text: bool = True) -> tuple[Any, int]:
        """The classifier-free-guidance model_fn of the sampler on the batch's conditions (B examples; 2B per call
        unless `sample.guidance` is 1). Text models: with the text cache computed once, as `sample` runs it
        (`cache_text=False`: the text encoded again in every call, for the benchmark's comparison)."""
        net = self.net
        cond, null = {}, {}
        if net.num_classes:
            cond["label"], null["label"] = batch["label"], jnp.full((1,), net.num_classes, jnp.int32)
        if net.text_dim:
            cond["text"], cond["text_mask"] = batch[self.text_key], batch["text_mask"]
            null["text"], null["text_mask"] = self.null_text(1, self.config.data.text_len)
            if cache_text:
                for branch in (cond, null):
                    branch["text_cache"] = _text_cache_fn(net)(params, branch.pop("text"), branch.pop("text_mask"))
        guidance = self.config.sample.guidance
        model_fn = diffusion.cfg_model_fn(Partial(_apply_fn(net), params), cond, null, guidance)
        b = batch["video"].shape[0]
        return model_fn, b if guidance == 1.0 else 2 * b

    def forward_flops(self, batch_size: int, text_cached: bool = False) -> dict[str, float]:
        from vdit_jax import bench

        return bench.forward_flops(
            self.net, (batch_size, *config_lib.input_shape(self.config)), self.config.data.text_len, text_cached
        )

    def tokens_per_example(self) -> int:
        from vdit_jax.models import layers

        return int(np.prod(layers.token_grid((1, *config_lib.input_shape(self.config)), self.net.patch_size)))

    # ---------------------------------------------------------------- checks

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check = config_lib.check
        try:
            mc = config_lib.model_config(config)
        except (TypeError, ValueError) as e:
            raise config_lib.ConfigError(f"config.model: {e}") from None
        shape = tuple(config.data.video_shape)
        check(mc.in_channels == shape[3], f"config.model.in_channels={mc.in_channels} != video channels {shape[3]}")
        check(
            mc.out_channels in (None, mc.in_channels),
            f"config.model.out_channels={mc.out_channels} must be None or in_channels={mc.in_channels} (the network "
            "predicts eps / v / x0, shaped like its input)",
        )
        t, h, w, _ = config_lib.input_shape(config)
        check(
            t % mc.patch_size[0] == 0 and h % mc.patch_size[1] == 0 and w % mc.patch_size[2] == 0,
            f"config.model.patch_size={tuple(mc.patch_size)} must divide the video (T, H, W) = {(t, h, w)}",
        )
        check(
            mc.num_classes == config.data.num_classes,
            f"config.model.num_classes={mc.num_classes} != config.data.num_classes={config.data.num_classes}",
        )
        check(
            config.data.text_len >= 0 and (config.data.text_len > 0) == (mc.text_dim > 0),
            f"config.data.text_len={config.data.text_len} and config.model.text_dim={mc.text_dim} must both be > 0 "
            "(text conditioning) or both be 0",
        )
        check(
            not mc.text_vocab or 2 <= config.data.text_len <= mc.text_max_len,
            f"config.data.text_len={config.data.text_len} must be in [2, model.text_max_len={mc.text_max_len}] for "
            "the built-in text encoder (<bos> and at least one word; its positions stop at text_max_len)",
        )
        f = config.frames
        names = ("rate_none", "rate_first", "rate_prefix", "rate_first_last")
        for name in names:
            check(0 <= f[name] <= 1, f"config.frames.{name}={f[name]} must be in [0, 1]")
        rates = [f[name] for name in names]
        check(abs(sum(rates) - 1) < 1e-6, f"config.frames rates {dict(zip(names, rates))} must sum to 1")
        check(
            f.max_prefix == 0 or 2 <= f.max_prefix <= t - 1,
            f"config.frames.max_prefix={f.max_prefix} must be 0 (= max(T // 2, 2)) or in [2, T - 1 = {t - 1}]",
        )
        check(
            not mc.frame_conditioning or t >= 3,
            f"frame conditioning needs clips of >= 3 frames (the first and the last given leave one to generate), "
            f"got T = {t}",
        )
        grid = (t // mc.patch_size[0], h // mc.patch_size[1], w // mc.patch_size[2])
        if mc.attention == "windowed":
            for win in mc.windows:
                clipped = tuple(min(a, g) for a, g in zip(win, grid))
                check(
                    all(g % a == 0 for a, g in zip(clipped, grid)),
                    f"config.model.windows entry {tuple(win)} must divide the token grid {grid}",
                )

    @classmethod
    def validate_mesh(cls, config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> None:
        check = config_lib.check
        mc = config_lib.model_config(config)
        t, h, w, _ = config_lib.input_shape(config)
        grid = (t // mc.patch_size[0], h // mc.patch_size[1], w // mc.patch_size[2])
        n_tokens = grid[0] * grid[1] * grid[2]
        check(
            n_tokens % mesh_sizes[sh.SEQUENCE] == 0,
            f"the {n_tokens} tokens per video must be divisible by the sequence axis {mesh_sizes[sh.SEQUENCE]}",
        )
        check(
            mc.num_heads % mesh_sizes[sh.TENSOR] == 0,
            f"config.model.num_heads={mc.num_heads} must be divisible by the tensor axis {mesh_sizes[sh.TENSOR]}",
        )
