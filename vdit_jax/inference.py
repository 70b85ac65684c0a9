"""Sampling videos from a trained model: usable from a notebook, the sample CLI and the trainer.

The whole denoising loop (with classifier-free guidance) is one jitted function from `vdit_jax.diffusion`;
the network is passed as `Partial(apply, params)`, so sampling again with new parameters reuses the compiled loop.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.tree_util import Partial

from vdit_jax import config as config_lib
from vdit_jax import diffusion, paths
from vdit_jax.models import dit
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib


@functools.cache
def _apply_fn(model_cfg: dit.DiTConfig):
    """One function object per model config, so jit caches hit across calls; `cond` is a dict of the conditioning
    the model takes ("label", "text", "text_mask")."""
    model = dit.DiT(model_cfg)

    def apply(params, x, t, cond, x0_prev=None):  # x0_prev: the samplers' self-conditioning estimate
        return model.apply(
            {"params": params}, x, t, cond.get("label"), cond.get("text"), x0_prev, cond.get("text_mask")
        )

    return apply


def to_uint8(videos: jax.Array) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.asarray(jnp.clip(jnp.round((videos + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def sample(
    config: ml_collections.ConfigDict,
    params,
    labels: np.ndarray | None,
    rng: jax.Array,
    *,
    text: np.ndarray | None = None,
    text_mask: np.ndarray | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    guidance: float | None = None,
    clip_x0: float | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Generates N videos: one per label, or per text for text models.

    Args:
      labels: int [N] in [0, num_classes) for class-conditional models (num_classes is the null class); for other
        models only their number counts (None is fine for text models).
      text, text_mask: text models (`model.text_dim > 0`) need text float [N, L, text_dim] precomputed embeddings and
        take text_mask bool [N, L] (True = a real token; None = all real). The unconditional branch of
        classifier-free guidance is `dit.null_text` (zeros, mask all True), as in training.
      sampler, steps, eta, guidance, clip_x0: default to `config.sample`.

    Returns:
      RGB models (`model.in_channels == 3`): uint8 [N, T, H, W, 3] pixels. Latent models (any other channel count):
      the raw float32 [N, T, H, W, C] latents (not clipped, not converted), for a decoder or `samples.npz`.
    """
    s = config.sample
    sampler = s.sampler if sampler is None else sampler
    steps = s.steps if steps is None else steps
    eta = s.eta if eta is None else eta
    guidance = s.guidance if guidance is None else guidance
    clip_x0 = s.clip_x0 if clip_x0 is None else clip_x0
    if sampler not in config_lib.SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {list(config_lib.SAMPLERS)}")
    model_cfg = config_lib.model_config(config)
    if model_cfg.text_dim:
        if text is None:
            raise ValueError(
                f"this model is text-conditional (model.text_dim={model_cfg.text_dim}): pass text [N, L, "
                f"{model_cfg.text_dim}] (and text_mask [N, L]), e.g. from data.sources.sample_conditions"
            )
        text = np.asarray(text, np.float32)
        if text.ndim != 3 or text.shape[2] != model_cfg.text_dim or len(text) == 0:
            raise ValueError(f"text must be float [N, L, {model_cfg.text_dim}] with N >= 1, got {text.shape}")
        text_mask = np.ones(text.shape[:2], bool) if text_mask is None else np.asarray(text_mask)
        if text_mask.shape != text.shape[:2] or text_mask.dtype != bool:
            raise ValueError(f"text_mask must be bool {text.shape[:2]}, got {text_mask.dtype} {text_mask.shape}")
        labels = np.zeros((len(text),), np.int32) if labels is None else labels
    if labels is None:
        raise ValueError("no labels given: pass one label per video to sample")
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.size == 0:
        raise ValueError("no labels given: pass one label per video to sample")
    if model_cfg.num_classes and (labels.min(initial=0) < 0 or labels.max(initial=0) >= model_cfg.num_classes):
        raise ValueError(f"labels must be in [0, {model_cfg.num_classes}), got {labels.tolist()}")
    if model_cfg.text_dim and len(labels) != len(text):
        raise ValueError(f"got {len(labels)} labels but {len(text)} texts: give one of each per video")
    sched = config_lib.schedule(config)
    shape = config_lib.input_shape(config)
    apply = Partial(_apply_fn(model_cfg), params)
    null = {}
    if model_cfg.num_classes:
        null["label"] = jnp.full((1,), model_cfg.num_classes, jnp.int32)
    if model_cfg.text_dim:
        null["text"], null["text_mask"] = dit.null_text(1, text.shape[1], model_cfg.text_dim)
    guided = float(guidance) if null else 1.0  # an unconditional model has nothing to guide
    out = []
    chunks = range(0, len(labels), batch_size)
    for start in tqdm.tqdm(chunks, desc=f"{sampler} x{len(chunks)}", disable=not progress, dynamic_ncols=True):
        rows = slice(start, start + batch_size)
        n = len(labels[rows])
        cond = {}
        if model_cfg.num_classes:
            cond["label"] = jnp.asarray(labels[rows])
        if model_cfg.text_dim:
            cond["text"], cond["text_mask"] = jnp.asarray(text[rows]), jnp.asarray(text_mask[rows])
        model_fn = diffusion.cfg_model_fn(apply, cond, null, guided)
        key = jax.random.fold_in(rng, start)
        kw = dict(clip_x0=clip_x0 or None, self_condition=model_cfg.self_condition)
        if sampler == "ddim":
            x = diffusion.ddim_sample(model_fn, sched, (n, *shape), key, num_steps=steps, eta=eta, **kw)
        else:
            x = diffusion.ddpm_sample(model_fn, sched, (n, *shape), key, variance=s.ddpm_variance, **kw)
        out.append(to_uint8(x) if model_cfg.in_channels == 3 else np.asarray(x, np.float32))
    return np.concatenate(out)


def gather_params(params):
    """Parameters as host NumPy arrays (gathered from every process when they are sharded across hosts)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def load(workdir, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, EMA params, step) of the latest (or a given) checkpoint of a training workdir, on one device.

    `workdir` is any `etils.epath` path (a local directory or `gs://bucket/run`).

    Raises:
      FileNotFoundError: the workdir has no checkpoints or no config.json.
    """
    workdir = paths.resolve(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints under {os.fspath(workdir)!r} (expected {os.fspath(ckpt_dir)})")
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {os.fspath(workdir)!r}: is it a vdit_jax training workdir?")
    config = config_from_json(ml_collections.ConfigDict(json.loads(config_path.read_text())))
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    # Only the EMA is read: the raw parameters and the optimizer state (3x the EMA's size) stay on disk, and the
    # optimizer state's saved structure does not matter.
    target = {"ema_params": state_lib.abstract_state(config, mesh, rules).ema_params}
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
        restored_step, restored = checkpointer.restore(target, step=step, partial=True)
    finally:
        checkpointer.close()
    return config, restored["ema_params"], int(restored_step)


def config_from_json(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config read back from JSON, on top of the base config so tuples and new keys are right."""
    base = config_lib.base_config()
    base.update_from_flattened_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in _flatten(config.to_dict()).items()}
    )
    base.logical_axis_rules = sh.rules_from_config(config.logical_axis_rules)
    return base


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k == "logical_axis_rules":
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
