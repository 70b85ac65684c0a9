"""Sampling videos from a trained model: usable from a notebook, the sample CLI and the trainer.

The whole denoising loop (with classifier-free guidance) is one jitted function from `vdit_jax.diffusion`;
the network is passed as `Partial(apply, params)`, so sampling again with new parameters reuses the compiled loop.
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.tree_util import Partial

from vdit_jax import config as config_lib
from vdit_jax import diffusion
from vdit_jax.models import dit
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib


@functools.cache
def _apply_fn(model_cfg: dit.DiTConfig):
    """One function object per model config, so jit caches hit across calls."""
    model = dit.DiT(model_cfg)

    def apply(params, x, t, labels, x0_prev=None):  # x0_prev: the samplers' self-conditioning estimate
        return model.apply({"params": params}, x, t, labels if model_cfg.num_classes else None, None, x0_prev)

    return apply


def to_uint8(videos: jax.Array) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.asarray(jnp.clip(jnp.round((videos + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def sample(
    config: ml_collections.ConfigDict,
    params,
    labels: np.ndarray,
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
    """Generates one video per label; returns uint8 [N, T, H, W, C].

    Sampler settings default to `config.sample`; labels must be in [0, num_classes) (num_classes = the null class).
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
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.size == 0:
        raise ValueError("no labels given: pass one label per video to sample")
    if model_cfg.num_classes and (labels.min(initial=0) < 0 or labels.max(initial=0) >= model_cfg.num_classes):
        raise ValueError(f"labels must be in [0, {model_cfg.num_classes}), got {labels.tolist()}")
    d = config.diffusion
    sched = diffusion.make_schedule(d.schedule, d.num_timesteps, prediction=d.prediction)
    shape = config_lib.input_shape(config)
    apply = Partial(_apply_fn(model_cfg), params)
    out = []
    chunks = range(0, len(labels), batch_size)
    for start in tqdm.tqdm(chunks, desc=f"{sampler} x{len(chunks)}", disable=not progress, dynamic_ncols=True):
        chunk = labels[start : start + batch_size]
        n = len(chunk)
        if model_cfg.num_classes:
            null = jnp.full((n,), model_cfg.num_classes, jnp.int32)
            model_fn = diffusion.cfg_model_fn(apply, jnp.asarray(chunk), null, float(guidance))
        else:
            model_fn = diffusion.cfg_model_fn(apply, jnp.asarray(chunk), jnp.asarray(chunk), 1.0)
        key = jax.random.fold_in(rng, start)
        kw = dict(clip_x0=clip_x0 or None, self_condition=model_cfg.self_condition)
        if sampler == "ddim":
            x = diffusion.ddim_sample(model_fn, sched, (n, *shape), key, num_steps=steps, eta=eta, **kw)
        else:
            x = diffusion.ddpm_sample(model_fn, sched, (n, *shape), key, variance=s.ddpm_variance, **kw)
        out.append(to_uint8(x))
    return np.concatenate(out)


def gather_params(params):
    """Parameters as host NumPy arrays (gathered from every process when they are sharded across hosts)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def load(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, EMA params, step) of the latest (or a given) checkpoint of a training workdir, on one device."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints under {workdir!r} (expected {ckpt_dir})")
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config = config_from_json(config)
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    abstract = state_lib.abstract_state(config, mesh, rules)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
        restored_step, state = checkpointer.restore(abstract, step=step)
    finally:
        checkpointer.close()
    return config, nn.unbox(state.ema_params), int(restored_step)


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
