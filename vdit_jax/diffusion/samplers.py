"""DDPM and DDIM samplers, each one jitted function over the whole denoising loop, and CFG.

Compile once, sample with any parameters: ``model_fn`` travels into the jitted loop as a pytree. Pass a
``jax.tree_util.Partial(apply, params)``: its function is static (part of the tree structure) and its
arguments are traced, so new params reuse the compiled loop. A plain callable is wrapped as
``Partial(model_fn)``; it then retraces whenever a *different* callable object is passed (a fresh lambda per
call recompiles — close over params with ``Partial``, not a lambda). ``shape``, ``num_steps``, ``eta``,
``variance`` and ``clip_x0`` are static; the `Schedule` is a traced pytree.

``model_fn(x_t, t)`` takes x_t float32 [B, ...] and t int32 [B] in [0, T) and returns the prediction of
``sched.prediction`` (eps, v or x0) with x_t's shape. With ``self_condition=True`` it is ``model_fn(x_t, t, x0)``:
the loop carries the x0 of the previous step (zeros at the first) into the next (Chen et al. 2022).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from vdit_jax.diffusion.objectives import ModelFn, predict_x0_and_eps, x0_to_eps
from vdit_jax.diffusion.schedules import Schedule, extract

VARIANCES = ("fixed_small", "fixed_large")  # posterior variance β̃_t / the forward variance β_t


def _as_partial(model_fn: ModelFn) -> Partial:
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
    return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints [B, ...], got {shape}")
    return shape


def _check_clip(clip_x0: float | None) -> float | None:
    if clip_x0 is None:
        return None
    if not (isinstance(clip_x0, int | float) and math.isfinite(clip_x0) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a finite number > 0, got {clip_x0!r}")
    return float(clip_x0)


def _denoise(model_fn: Partial, sched: Schedule, x: jax.Array, t: jax.Array, clip_x0: float | None, x0_prev=None):
    """Runs the model at x_t (and the previous x0 estimate when self-conditioning) and returns the implied
    (x0, eps), x0 optionally clipped to ±clip_x0."""
    pred = (model_fn(x, t) if x0_prev is None else model_fn(x, t, x0_prev)).astype(jnp.float32)
    x0, eps = predict_x0_and_eps(sched, pred, x, t)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = x0_to_eps(sched, x0, x, t)  # keep eps consistent with the clipped x0
    return x0, eps


# --------------------------------------------------------------------------------------------------- DDPM


@functools.partial(jax.jit, static_argnames=("shape", "variance", "clip_x0", "self_condition"))
def _ddpm_loop(model_fn, sched, rng, *, shape, variance, clip_x0, self_condition):
    init_rng, loop_rng = jax.random.split(rng)
    T = sched.num_timesteps
    if variance == "fixed_small":
        log_var = sched.posterior_log_variance_clipped
    else:
        # β_t, with β_0 replaced by β̃_1 as in guided-diffusion (β_0 is far below the scale of the
        # posterior there). Sampling never uses it — the t = 0 step adds no noise — but the table matches.
        log_var = jnp.log(sched.betas)
        if T > 1:
            log_var = log_var.at[0].set(jnp.log(sched.posterior_variance[1]))

    def step(i, carry):  # x: [B, ...] = x_t with t = T - 1 - i; x0_prev: the previous step's x0 (self-conditioning)
        x, x0_prev = carry
        t = jnp.full((shape[0],), T - 1 - i, jnp.int32)
        x0, _ = _denoise(model_fn, sched, x, t, clip_x0, x0_prev if self_condition else None)
        mean = extract(sched.posterior_mean_coef1, t, x.ndim) * x0 + extract(sched.posterior_mean_coef2, t, x.ndim) * x
        z = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
        std = jnp.where(t > 0, jnp.exp(0.5 * log_var[t]), 0.0)  # [B]; no noise on the last step
        return mean + std.reshape((-1,) + (1,) * (x.ndim - 1)) * z, x0

    x_T = jax.random.normal(init_rng, shape, jnp.float32)
    return jax.lax.fori_loop(0, T, step, (x_T, jnp.zeros(shape, jnp.float32)))[0]


def ddpm_sample(
    model_fn: ModelFn,
    sched: Schedule,
    shape,
    rng: jax.Array,
    variance: str = "fixed_small",
    clip_x0: float | None = None,
    self_condition: bool = False,
) -> jax.Array:
    """Ancestral sampling (Ho et al. 2020) through all T steps of ``sched``; returns x0 float32 ``shape``.

    Args:
      model_fn: see the module docstring; prefer ``Partial(apply, params)`` to reuse the compiled loop.
      shape: the sample batch shape [B, ...], e.g. (B, T, H, W, C) for videos.
      variance: "fixed_small" (β̃_t, the posterior variance) or "fixed_large" (β_t); both are the
        bounds of the optimal reverse variance and give similar samples with a good model.
      clip_x0: if set, clip the predicted x0 to [-clip_x0, clip_x0] at every step (pixel data in [-1, 1]).
      self_condition: call ``model_fn(x_t, t, x0_prev)`` with the previous step's x0 (zeros at the first step).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    return _ddpm_loop(
        _as_partial(model_fn),
        sched,
        rng,
        shape=_check_shape(shape),
        variance=variance,
        clip_x0=_check_clip(clip_x0),
        self_condition=bool(self_condition),
    )


# --------------------------------------------------------------------------------------------------- DDIM


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The evenly spaced timesteps DDIM visits, ascending int32 [num_steps], always including T - 1.

    Spacing is ``linspace(0, T - 1)`` rounded (distinct while num_steps <= T) so the first step starts from
    the noisiest level the model was trained on (Lin et al. 2024 show skipping it biases brightness).
    """
    if num_steps == 1:
        return np.array([num_timesteps - 1], np.int32)
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("shape", "num_steps", "eta", "clip_x0", "self_condition"))
def _ddim_loop(model_fn, sched, rng, *, shape, num_steps, eta, clip_x0, self_condition):
    init_rng, loop_rng = jax.random.split(rng)
    ts = ddim_timesteps(sched.num_timesteps, num_steps)[::-1]  # descending
    t_prev = np.append(ts[1:], -1)  # -1: the final step lands on clean data, ᾱ = 1
    ts, t_prev = jnp.asarray(ts), jnp.asarray(t_prev)
    ac_all = sched.alphas_cumprod

    def step(i, carry):
        x, x0_prev = carry
        t = jnp.full((shape[0],), ts[i], jnp.int32)
        x0, eps = _denoise(model_fn, sched, x, t, clip_x0, x0_prev if self_condition else None)
        ac = ac_all[ts[i]]
        ac_prev = jnp.where(t_prev[i] >= 0, ac_all[jnp.maximum(t_prev[i], 0)], 1.0)
        one_m_ac = jnp.square(sched.sqrt_one_minus_alphas_cumprod[ts[i]])
        # σ² = η² β̃ for the skipped interval (Song et al. 2021, eq. 16); η = 1 recovers DDPM's fixed_small.
        var = eta**2 * (1.0 - ac_prev) / one_m_ac * (1.0 - ac / ac_prev)
        x_prev = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ac_prev - var, 0.0)) * eps
        if eta > 0:
            z = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
            x_prev = x_prev + jnp.sqrt(var) * z
        return x_prev, x0

    x_T = jax.random.normal(init_rng, shape, jnp.float32)
    return jax.lax.fori_loop(0, num_steps, step, (x_T, jnp.zeros(shape, jnp.float32)))[0]


def ddim_sample(
    model_fn: ModelFn,
    sched: Schedule,
    shape,
    rng: jax.Array,
    num_steps: int = 50,
    eta: float = 0.0,
    clip_x0: float | None = None,
    self_condition: bool = False,
) -> jax.Array:
    """DDIM sampling (Song et al. 2021) over ``num_steps`` evenly respaced timesteps; returns x0 ``shape``.

    Args:
      model_fn: see the module docstring; prefer ``Partial(apply, params)`` to reuse the compiled loop.
      shape: the sample batch shape [B, ...].
      num_steps: 1 <= num_steps <= T denoising steps (`ddim_timesteps`).
      eta: noise scale >= 0: 0 is the deterministic DDIM ODE, 1 is DDPM-like ancestral sampling.
      clip_x0: if set, clip the predicted x0 to [-clip_x0, clip_x0] at every step.
      self_condition: call ``model_fn(x_t, t, x0_prev)`` with the previous step's x0 (zeros at the first step).
    """
    T = sched.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}] (the schedule's T), got {num_steps}")
    if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (0 = deterministic, 1 = DDPM), got {eta!r}")
    return _ddim_loop(
        _as_partial(model_fn),
        sched,
        rng,
        shape=_check_shape(shape),
        num_steps=int(num_steps),
        eta=float(eta),
        clip_x0=_check_clip(clip_x0),
        self_condition=bool(self_condition),
    )


# ------------------------------------------------------------------------------ classifier-free guidance


def _concat_batch(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, jnp.broadcast_to(y, x.shape).astype(x.dtype)]), a, b)


def _guided(apply_fn, cond, null_cond, guidance, x, t, *x0_prev):
    batch = x.shape[0]
    twice = lambda a: jnp.concatenate([a, a])
    # one call, batch 2B: [cond; uncond]; both branches see the (guided) previous x0 when self-conditioning
    out = apply_fn(twice(x), twice(t), _concat_batch(cond, null_cond), *map(twice, x0_prev))
    c, u = out[:batch], out[batch:]
    return u + guidance * (c - u)


def _conditional(apply_fn, cond, x, t, *x0_prev):
    return apply_fn(x, t, cond, *x0_prev)


def cfg_model_fn(
    apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    null_cond: Any,
    guidance: float | jax.Array,
) -> Partial:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``model_fn(x_t, t)`` for the samplers.

    Returns uncond + guidance · (cond − uncond), evaluating both branches in ONE call of
    ``apply_fn(x [2B, ...], t [2B], cond)`` on the batch [cond; null_cond]. Guidance mixes the model's
    native prediction (eps, v or x0). All three conversions to (x0, eps) are affine in the prediction with
    the same x_t, so the mix is the same whichever target the model predicts — until ``clip_x0`` clips it.
    For the samplers' self-conditioning the returned function also takes the previous x0 and passes it on,
    doubled, as ``apply_fn``'s fourth argument.

    Args:
      apply_fn: (x, t, cond) -> prediction; pass ``Partial(apply, params)`` to reuse compiled samplers.
      cond: a pytree of arrays with leading batch dim B (labels [B], text embeddings [B, L, D], ...).
      null_cond: the "no conditioning" pytree with cond's structure; each leaf is broadcast to cond's
        shape, so a single null embedding [1, L, D] serves the whole batch.
      guidance: the scale; 1.0 (a Python number) short-circuits to the conditional model alone. Any other
        value is traced, so changing it does not recompile the sampler.

    Returns:
      A ``jax.tree_util.Partial`` usable as ``model_fn`` by `ddpm_sample` / `ddim_sample`.
    """
    apply_fn = _as_partial(apply_fn)  # a pytree, so it can ride inside the returned Partial
    if isinstance(guidance, int | float) and guidance == 1.0:
        return Partial(_conditional, apply_fn, cond)
    guidance = jnp.asarray(guidance, jnp.float32)
    return Partial(_guided, apply_fn, cond, null_cond, guidance)
