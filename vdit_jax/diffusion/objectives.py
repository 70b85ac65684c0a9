"""Forward process, training targets, exact conversions between targets, and the training loss.

Everything takes a `Schedule` and integer timesteps t [B]; per-example coefficients broadcast over any
trailing shape, so the same code serves images [B, H, W, C] and videos [B, T, H, W, C].

With a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t) (so a² + s² = 1):
  x_t = a x0 + s eps,    v = a eps - s x0    (Salimans & Ho 2022),
  x0  = a x_t - s v,     eps = s x_t + a v.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdit_jax.diffusion.schedules import PREDICTIONS, Schedule, extract, snr

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t int32 [B]) -> prediction [B, ...]
# (x_t, t, x0_estimate [B, ...]) -> prediction: a self-conditioned network (zeros = no estimate)
SelfCondModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
SELF_CONDITION_RATE = 0.5  # Chen et al. 2022: half of the training steps see the network's own estimate


def _coef(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    return extract(table, t, x.ndim)


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x0) given the noise: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise."""
    return _coef(sched.sqrt_alphas_cumprod, t, x0) * x0 + _coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def get_target(sched: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The regression target for ``sched.prediction`` given the clean data and the noise that made x_t."""
    if sched.prediction == "eps":
        return noise
    if sched.prediction == "x0":
        return x0
    if sched.prediction == "v":
        return _coef(sched.sqrt_alphas_cumprod, t, x0) * noise - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    raise ValueError(f"unknown prediction {sched.prediction!r}; allowed: {', '.join(PREDICTIONS)}")


# Pairwise conversions. Each is exact given x_t; those dividing by sqrt(ᾱ_t) (eps → x0, eps → v) are
# inherently ill-conditioned at the noisiest timesteps, where sqrt(ᾱ_t) is tiny.


def eps_to_x0(sched: Schedule, eps: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _coef(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def x0_to_eps(sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    # eps = (x_t - a x0) / s: finite at ᾱ = 0 (zero terminal SNR), where it is x_t
    return (x_t - _coef(sched.sqrt_alphas_cumprod, t, x_t) * x0) / _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t)


def v_to_x0(sched: Schedule, v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_alphas_cumprod, t, x_t) * x_t - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def v_to_eps(sched: Schedule, v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + _coef(sched.sqrt_alphas_cumprod, t, x_t) * v


def x0_to_v(sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    # v = (a x_t - x0) / s
    return (_coef(sched.sqrt_alphas_cumprod, t, x_t) * x_t - x0) / _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t)


def eps_to_v(sched: Schedule, eps: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    # v = (eps - s x_t) / a
    return (eps - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t) * _coef(
        sched.sqrt_recip_alphas_cumprod, t, x_t
    )


def predict_x0_and_eps(sched: Schedule, pred: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Converts a network output in ``sched.prediction`` space to the implied (x0, eps)."""
    if sched.prediction == "eps":
        return eps_to_x0(sched, pred, x_t, t), pred
    if sched.prediction == "x0":
        return pred, x0_to_eps(sched, pred, x_t, t)
    if sched.prediction == "v":
        return v_to_x0(sched, pred, x_t, t), v_to_eps(sched, pred, x_t, t)
    raise ValueError(f"unknown prediction {sched.prediction!r}; allowed: {', '.join(PREDICTIONS)}")


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_TYPES = ("mse", "l1")


def sample_timesteps(
    rng: jax.Array,
    batch: int,
    num_timesteps: int,
    sampling: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> jax.Array:
    """Integer training timesteps in [0, num_timesteps), int32 [batch].

    ``uniform``: every t equally often. ``logit_normal`` (Esser et al. 2024, SD3): t / T = sigmoid(u) with
    u ~ N(logit_mean, logit_std), which trains the middle of the schedule more than its ends; a positive mean
    moves the mass to noisier steps, a negative one to cleaner steps.
    """
    if sampling == "uniform":
        return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
    if sampling == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
        return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
    raise ValueError(f"unknown timestep sampling {sampling!r}; allowed: {', '.join(TIMESTEP_SAMPLINGS)}")


def min_snr_weight(sched: Schedule, t: jax.Array, gamma: float, floor: float = 0.0) -> jax.Array:
    """Min-SNR-γ loss weight (Hang et al. 2023) for ``sched.prediction``, float32 [B].

    The paper weights the x0-space MSE by min(SNR, γ); an eps-MSE equals SNR · x0-MSE and a v-MSE equals
    (SNR + 1) · x0-MSE, so the same weighting in those spaces divides by SNR and SNR + 1 respectively.
    ``floor`` > 0 clips the x0-space weight from below too, clip(SNR, floor, γ): min-SNR's emphasis on the
    low-noise steps without starving the high-noise ones, where a conditional model learns its conditioning
    (floor 1 is the "truncated SNR" x0 weighting of Salimans & Ho 2022, capped at γ).
    """
    r = snr(sched, t)
    clipped = jnp.clip(r, floor, gamma)
    if sched.prediction == "eps":
        return clipped / r
    if sched.prediction == "v":
        return clipped / (r + 1.0)
    if sched.prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction {sched.prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def self_conditioned(
    model_fn: SelfCondModelFn, sched: Schedule, rng: jax.Array, rate: float = SELF_CONDITION_RATE
) -> ModelFn:
    """Self-conditioning in training (Chen et al. 2022): a ``model_fn(x_t, t)`` for `loss_fn` from a network that
    also takes an x0 estimate.

    With probability ``rate`` (one draw for the whole batch, so the extra pass runs only then, under ``lax.cond``)
    the network first predicts from (x_t, zeros); the x0 its prediction implies, gradient stopped, is then fed back
    with x_t. Otherwise the estimate is zeros. Sampling feeds each step the previous step's x0 (the samplers'
    ``self_condition=True``), which the network thus learns to refine.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"self-conditioning rate must be in [0, 1], got {rate!r}")

    def fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        zeros = jnp.zeros_like(x_t)

        def estimate(_):
            x0, _ = predict_x0_and_eps(sched, model_fn(x_t, t, zeros).astype(jnp.float32), x_t, t)
            return jax.lax.stop_gradient(x0.astype(x_t.dtype))

        x0 = jax.lax.cond(jax.random.bernoulli(rng, rate), estimate, lambda _: zeros, None)
        return model_fn(x_t, t, x0)

    return fn


def loss_fn(
    model_fn: ModelFn,
    sched: Schedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    min_snr_gamma: float | None = None,
    min_snr_floor: float = 0.0,
    mask: jax.Array | None = None,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    loss_type: str = "mse",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example denoising loss: (weighted) MSE between ``model_fn(x_t, t)`` and the schedule's target.

    Args:
      model_fn: (x_t [B, ...], t int32 [B]) -> prediction [B, ...] of ``sched.prediction``.
      x0: clean data [B, ...] (e.g. video latents [B, T, H, W, C]).
      rng: draws t (uniform over [0, T)) and the Gaussian noise, unless those are given.
      min_snr_gamma: if set, Min-SNR-γ weighting (γ = 5 in the paper); None weights every t equally.
      min_snr_floor: lower clip of the x0-space min-SNR weight (see `min_snr_weight`); 0 = plain min-SNR.
      mask: optional non-negative weights broadcastable to x0 (e.g. [B, T, 1, 1, 1] to score only generated
        frames); the MSE is then a weighted mean over the masked elements of each example.
      t, noise: fix the timesteps [B] / noise [B, ...] instead of drawing them (evaluation at set noise levels).
      loss_type: ``mse`` (the diffusion ELBO's form) or ``l1``, the mean absolute error (Saharia et al. 2022,
        Palette): a median instead of a mean regression, less prone to half-on pixels; ``aux["mse"]`` stays the MSE.

    Returns:
      (loss [B] float32, aux) with aux = {"t": [B], "mse": unweighted MSE [B], "weight": [B]}.
    """
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be None or > 0 (5.0 in the paper), got {min_snr_gamma!r}")
    if min_snr_gamma is not None and not 0 <= min_snr_floor <= min_snr_gamma:
        raise ValueError(f"min_snr_floor must be in [0, min_snr_gamma={min_snr_gamma}], got {min_snr_floor!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    batch = x0.shape[0]
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
        t = sample_timesteps(t_rng, batch, sched.num_timesteps)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(sched, x0, t, noise)
    pred = model_fn(x_t, t).astype(jnp.float32)
    diff = pred - get_target(sched, x0, noise, t)  # [B, ...]
    axes = tuple(range(1, diff.ndim))
    w = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, jnp.float32), diff.shape)

    def mean(err):
        if w is None:
            return jnp.mean(err, axis=axes)
        return jnp.sum(w * err, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), 1e-8)

    mse = mean(jnp.square(diff))
    per_example = mse if loss_type == "mse" else mean(jnp.abs(diff))
    if min_snr_gamma is None:
        weight = jnp.ones((batch,), jnp.float32)
    else:
        weight = min_snr_weight(sched, t, min_snr_gamma, min_snr_floor)
    return weight * per_example, {"t": t, "mse": mse, "weight": weight}
