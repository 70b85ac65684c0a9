"""Diffusion math, no networks: noise schedules, q(x_t | x0), targets and losses, DDPM/DDIM samplers, CFG.

    sched = diffusion.make_schedule("cosine", num_timesteps=1000, prediction="v")
    loss, aux = diffusion.loss_fn(model_fn, sched, x0, rng, min_snr_gamma=5.0)   # loss: [B]
    x0 = diffusion.ddim_sample(Partial(apply, params), sched, (B, T, H, W, C), rng, num_steps=50)

Losses and samplers take ``model_fn(x_t, t) -> prediction`` (t int32 [B] in [0, T)); the prediction target
(eps, v or x0) is a static field of the `Schedule`. A self-conditioned network, ``model_fn(x_t, t, x0_estimate)``,
trains through ``loss_fn(self_conditioned(model_fn, sched, rng), ...)`` and samples with ``self_condition=True``.
"""

from vdit_jax.diffusion.config import DiffusionConfig
from vdit_jax.diffusion.objectives import (
    LOSS_TYPES,
    SELF_CONDITION_RATE,
    TIMESTEP_SAMPLINGS,
    eps_to_v,
    eps_to_x0,
    get_target,
    loss_fn,
    min_snr_weight,
    predict_x0_and_eps,
    q_sample,
    sample_timesteps,
    self_conditioned,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)
from vdit_jax.diffusion.samplers import (
    VARIANCES,
    cfg_model_fn,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
)
from vdit_jax.diffusion.schedules import (
    PREDICTIONS,
    SCHEDULES,
    Schedule,
    make_betas,
    make_schedule,
    snr,
)

__all__ = [
    "DiffusionConfig",
    "LOSS_TYPES",
    "PREDICTIONS",
    "SCHEDULES",
    "SELF_CONDITION_RATE",
    "TIMESTEP_SAMPLINGS",
    "VARIANCES",
    "Schedule",
    "cfg_model_fn",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "eps_to_v",
    "eps_to_x0",
    "get_target",
    "loss_fn",
    "make_betas",
    "make_schedule",
    "min_snr_weight",
    "predict_x0_and_eps",
    "q_sample",
    "sample_timesteps",
    "self_conditioned",
    "snr",
    "v_to_eps",
    "v_to_x0",
    "x0_to_eps",
    "x0_to_v",
]
