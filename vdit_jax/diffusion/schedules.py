"""Noise schedules: the tables every other piece of diffusion math reads.

Tables are computed once in float64 NumPy and cast to float32 (as in guided-diffusion), so quantities that
suffer from cancellation in float32 (``1 - alphas_cumprod`` near t = 0, ``1 / sqrt(alphas_cumprod)`` near
t = T) keep full precision. A `Schedule` is a pytree: pass it to jitted functions as an ordinary argument;
its ``prediction`` and ``num_timesteps`` are static (part of the tree structure), so they never get traced.

Convention: x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps, t in [0, T).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")  # what the network predicts: the noise, the velocity, or the clean data

COSINE_S = 0.008  # improved-DDPM offset: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # improved-DDPM clip: the last cosine beta would otherwise be 1
# The samplers start from N(0, I): the forward process must be (close to) pure noise at t = T - 1. SD's scaled_linear
# at T = 1000 ends at ᾱ = 0.0047; a schedule ending above this is refused.
MAX_TERMINAL_ALPHA_CUMPROD = 0.01


@flax.struct.dataclass
class Schedule:
    """Per-timestep tables of a discrete diffusion process, all float32 [T]."""

    betas: jax.Array
    alphas: jax.Array  # 1 - betas
    alphas_cumprod: jax.Array  # ᾱ_t
    alphas_cumprod_prev: jax.Array  # ᾱ_{t-1}, with ᾱ_{-1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(ᾱ_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / ᾱ_t - 1)
    posterior_variance: jax.Array  # β̃_t: variance of q(x_{t-1} | x_t, x0); 0 at t = 0
    posterior_log_variance_clipped: jax.Array  # log β̃_t with β̃_0 replaced by β̃_1 (log 0 is -inf)
    posterior_mean_coef1: jax.Array  # mean of q(x_{t-1} | x_t, x0) = coef1 * x0 + coef2 * x_t
    posterior_mean_coef2: jax.Array
    prediction: str = flax.struct.field(pytree_node=False, default="eps")  # one of PREDICTIONS
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)


def _check_choice(kind: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def make_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The float64 beta table [T] of a named schedule (see `SCHEDULES`)."""
    _check_choice("schedule", name, SCHEDULES)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    T = int(num_timesteps)
    if name == "linear":
        # DDPM's 1e-4 → 0.02 is tuned for T = 1000; improved-DDPM rescales it so any T covers the same range
        # of noise levels. For T <= 20 the last betas would reach 1 (impossible): clip them like cosine's.
        scale = 1000.0 / T
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64), MAX_BETA)
    if name == "scaled_linear":
        # Latent diffusion (Stable Diffusion): linear in sqrt(beta), 0.00085 -> 0.012 at T = 1000; rescaled with T as
        # `linear` is (without it, T = 100 would end at ᾱ = 0.58, far from noise), clipped like cosine's.
        scale = 1000.0 / T
        betas = np.linspace(math.sqrt(scale * 0.00085), math.sqrt(scale * 0.012), T, dtype=np.float64) ** 2
        return np.minimum(betas, MAX_BETA)
    # cosine (Nichol & Dhariwal 2021): ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2).
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose ᾱ ends at exactly 0 (zero terminal SNR), Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1: sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first value
    is unchanged; the betas are recomputed from the new ᾱ (the last beta is 1)."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.append(ac[0], ac[1:] / ac[:-1])
    return 1.0 - alphas


def make_schedule(
    name: str, num_timesteps: int = 1000, prediction: str = "eps", *, zero_terminal_snr: bool = False
) -> Schedule:
    """Builds the `Schedule` for a named beta schedule and a network prediction target.

    Args:
      name: one of `SCHEDULES`.
      num_timesteps: T, the number of discrete noise levels (any length >= 1).
      prediction: one of `PREDICTIONS`; the target losses train for and samplers expect from ``model_fn``.
      zero_terminal_snr: rescale so that ᾱ_{T-1} = 0 (`rescale_zero_terminal_snr`): the last step is pure noise,
        as the samplers assume. Needs ``prediction`` v or x0 (at ᾱ = 0 an eps prediction says nothing of x0).

    Raises:
      ValueError: an unknown name or prediction, eps prediction with zero_terminal_snr, or a schedule whose
        ᾱ_{T-1} is above `MAX_TERMINAL_ALPHA_CUMPROD` (it never reaches the noise the samplers start from).
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if zero_terminal_snr and prediction == "eps":
        raise ValueError(
            "zero_terminal_snr needs prediction 'v' or 'x0': at ᾱ = 0 an eps prediction cannot give x0 "
            "(Lin et al. 2024)"
        )
    betas = make_betas(name, num_timesteps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    if ac[-1] > MAX_TERMINAL_ALPHA_CUMPROD:
        raise ValueError(
            f"schedule {name!r} with num_timesteps={num_timesteps} ends at ᾱ_(T-1) = {ac[-1]:.3g}, above "
            f"{MAX_TERMINAL_ALPHA_CUMPROD}: its last step is not the pure noise the samplers start from; use more "
            "timesteps or another schedule"
        )
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide="ignore"):  # ᾱ = 0 (zero terminal SNR): 1 / sqrt(ᾱ) is inf, never used for v / x0
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0; clip the log to β̃_1 as guided-diffusion does (for T = 1 there is no β̃_1: use β_0).
        post_var_clip = np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(post_var_clip),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
    return Schedule(
        **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
        prediction=prediction,
        num_timesteps=len(betas),
    )


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers ``table[t]`` for t [B] and shapes it [B, 1, ..., 1] to broadcast over an ndim-D batch."""
    t = jnp.asarray(t)
    return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def snr(sched: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at integer timesteps t (any shape), float32."""
    return (sched.sqrt_alphas_cumprod[t] / sched.sqrt_one_minus_alphas_cumprod[t]) ** 2
