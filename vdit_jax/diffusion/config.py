"""`DiffusionConfig`: the diffusion settings of a training run in one frozen dataclass (as `DiTConfig` is the
network's), read from `config.diffusion` by `vdit_jax.config.diffusion_config`."""

from __future__ import annotations

import dataclasses

import jax

from vdit_jax.diffusion import objectives
from vdit_jax.diffusion.schedules import Schedule, make_schedule


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How a network is trained as a denoiser (hashable: a static argument of jitted functions).

    Attributes:
      schedule: `linear` / `scaled_linear` / `cosine` (`diffusion.make_schedule`).
      num_timesteps: T, the length of the forward process.
      zero_terminal_snr: rescale the schedule to ᾱ_{T-1} = 0 (Lin et al. 2024); needs v or x0 prediction.
      prediction: what the network predicts: `eps`, `v` (Salimans & Ho 2022) or `x0`.
      loss: `mse` or `l1` on the prediction target.
      min_snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023); 0 = off.
      min_snr_floor: lower clip of the x0-space min-SNR weight; 0 = plain min-SNR.
      timestep_sampling: `uniform` or `logit_normal` (SD3), with `timestep_logit_mean` / `_std`.
      cond_dropout: probability that an example's condition (label / text) is replaced by the null condition in
        training, for classifier-free guidance (Ho & Salimans 2022). (`config.diffusion.label_dropout`.)
    """

    schedule: str = "cosine"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    prediction: str = "v"
    loss: str = "mse"
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 0.0
    timestep_sampling: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    cond_dropout: float = 0.1

    def make_schedule(self) -> Schedule:
        """The noise schedule; raises ValueError for one that cannot work (see `diffusion.make_schedule`)."""
        return make_schedule(
            self.schedule, self.num_timesteps, prediction=self.prediction, zero_terminal_snr=self.zero_terminal_snr
        )

    def sample_timesteps(self, rng: jax.Array, batch: int) -> jax.Array:
        """Training timesteps int32 [batch] in [0, num_timesteps), drawn as `timestep_sampling` says."""
        return objectives.sample_timesteps(
            rng,
            batch,
            self.num_timesteps,
            self.timestep_sampling,
            logit_mean=self.timestep_logit_mean,
            logit_std=self.timestep_logit_std,
        )

    def loss_fn(self, model_fn, sched: Schedule, x0: jax.Array, *, t, noise, mask=None):
        """`diffusion.loss_fn` with these settings: (per-example loss [B], aux)."""
        return objectives.loss_fn(
            model_fn,
            sched,
            x0,
            jax.random.key(0),  # unused: t and noise are given
            min_snr_gamma=self.min_snr_gamma or None,
            min_snr_floor=self.min_snr_floor,
            mask=mask,
            t=t,
            noise=noise,
            loss_type=self.loss,
        )
