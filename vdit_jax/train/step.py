"""The pure train step and its jitted, sharded form.

`train_step(state, batch, *, ...) -> (state, metrics)` is a module-level pure function: the diffusion loss comes
from `vdit_jax.diffusion`, the network from `vdit_jax.models`; the step adds label dropout, gradient accumulation,
the optimiser, the EMA and the skip of non-finite updates.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdit_jax import config as config_lib
from vdit_jax import diffusion
from vdit_jax.models import dit
from vdit_jax.parallel import sharding as sh
from vdit_jax.train.state import TrainState, make_optimizer, state_shardings

# {"video": float32 [B, T, H, W, C] (pixels in [-1, 1] or latents), "label": int32 [B], and for text models
#  (model.text_dim > 0) "text": float32 [B, L, text_dim] precomputed text-encoder embeddings and "text_mask": bool
#  [B, L] (True = a real token; optional for `train_step`, part of `batch_shapes`)}
Batch = dict[str, jax.Array]


def _loss(
    params,
    video,
    labels,
    t,
    noise,
    text,
    text_mask,
    self_cond_rng,
    *,
    model,
    sched,
    min_snr_gamma,
    min_snr_floor,
    num_classes,
    loss_type="mse",
):
    y = labels if num_classes else None
    if model.config.self_condition:
        net = lambda x_t, tt, x0: model.apply({"params": params}, x_t, tt, y, text, x0, text_mask)
        model_fn = diffusion.self_conditioned(net, sched, self_cond_rng)
    else:
        model_fn = lambda x_t, tt: model.apply({"params": params}, x_t, tt, y, text, None, text_mask)
    per_example, aux = diffusion.loss_fn(
        model_fn,
        sched,
        video,
        jax.random.key(0),
        min_snr_gamma=min_snr_gamma,
        min_snr_floor=min_snr_floor,
        t=t,
        noise=noise,
        loss_type=loss_type,
    )
    return jnp.mean(per_example), jnp.mean(aux["mse"])


def train_step(
    state: TrainState,
    batch: Batch,
    num_steps: jax.Array | int,
    *,
    model: dit.DiT,
    sched: diffusion.Schedule,
    tc: ml_collections.ConfigDict,
    min_snr_gamma: float | None,
    min_snr_floor: float,
    label_dropout: float,
    num_classes: int,
    timestep_sampling: dict[str, Any] | None = None,
    loss_type: str = "mse",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update from one global batch (split into `tc.grad_accum_steps` micro-batches).

    `num_steps` is the run's length for the learning-rate schedule (`state.make_optimizer`), an argument rather than
    a constant of the compiled step: runs that differ only in their length share one compiled step.

    Timesteps, noise and label / text dropout are drawn for the whole global batch before it is split, so an
    accumulated step computes the same gradient as one full-batch step. Text models read `batch["text"]` and
    `batch["text_mask"]` (absent = all tokens real) and replace an example's text by the null text (zeros, mask all
    True: `dit.null_text`) at the `label_dropout` rate.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    # One self-conditioning draw for the whole step (all micro-batches): accumulation keeps the full-batch gradient.
    self_cond_rng = jax.random.fold_in(drop_rng, 2)
    video, labels = batch["video"], batch["label"]
    text = batch["text"] if model.config.text_dim else None
    text_mask = batch.get("text_mask") if model.config.text_dim else None
    t = diffusion.sample_timesteps(t_rng, video.shape[0], sched.num_timesteps, **(timestep_sampling or {}))
    noise = jax.random.normal(noise_rng, video.shape, jnp.float32)
    if num_classes:
        labels = dit.drop_labels(drop_rng, labels, label_dropout, num_classes)
    if text is not None:
        text, text_mask = dit.drop_text(jax.random.fold_in(drop_rng, 1), text, label_dropout, text_mask)
    loss_fn = functools.partial(
        _loss,
        model=model,
        sched=sched,
        min_snr_gamma=min_snr_gamma,
        min_snr_floor=min_snr_floor,
        num_classes=num_classes,
        loss_type=loss_type,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = tc.grad_accum_steps
    if k == 1:
        (loss, mse), grads = grad_fn(state.params, video, labels, t, noise, text, text_mask, self_cond_rng)
    else:

        def split(a):  # [B, ...] -> [k, B / k, ...]: micro-batch i holds examples i, i + k, i + 2k, ...
            # Strided, not contiguous: each device's rows of the batch go to every micro-batch in equal parts, so
            # every micro-batch spans all data devices as the batch did and the split moves nothing between them.
            a = a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(a, (None, sh.BATCH) + (None,) * (a.ndim - 2))

        def accumulate(carry, micro):
            (loss_i, mse_i), g = grad_fn(state.params, *micro, self_cond_rng)
            return jax.tree.map(jnp.add, carry, (loss_i, mse_i, g)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
        micro = jax.tree.map(split, (video, labels, t, noise, text, text_mask))  # None stays None
        (loss, mse, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        loss, mse, grads = jax.tree.map(lambda a: a / k, (loss, mse, grads))

    grad_norm = optax.tree.norm(grads)
    tx = make_optimizer(tc, num_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(tc.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)

    # A non-finite loss or gradient leaves params, optimiser state and EMA untouched and is counted.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        "loss": loss,
        "mse": mse,
        "grad_norm": grad_norm,
        "finite": finite.astype(jnp.float32),
        "nonfinite_total": new_state.nonfinite_total,
        "nonfinite_streak": new_state.nonfinite_streak,
    }
    return new_state, metrics


class TrainStep:
    """`train_step` bound to a config and jitted with the state's and batch's shardings, donating the state:
    `step(state, batch) -> (state, metrics)`, and `step.lower(state, batch)` for ahead-of-time compiles.

    The run length (`config.train.num_steps`, for the learning-rate schedule) goes in as a traced argument, so the
    compiled program does not depend on it (a resumed run with a longer `num_steps` loads it from the persistent
    compilation cache instead of compiling again).
    """

    def __init__(self, jitted, num_steps: int):
        self.jitted = jitted
        self.num_steps = num_steps

    def __call__(self, state: TrainState, batch: Batch):
        return self.jitted(state, batch, self.num_steps)

    def lower(self, state, batch) -> jax.stages.Lowered:
        return self.jitted.lower(state, batch, self.num_steps)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> TrainStep:
    """The jitted, sharded train step of `config` (a `TrainStep`).

    Call it inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (as `loop.train` does).
    """
    d = config.diffusion
    step = functools.partial(
        train_step,
        model=dit.DiT(config_lib.model_config(config)),
        sched=config_lib.schedule(config),
        tc=config.train,
        min_snr_gamma=d.min_snr_gamma or None,
        min_snr_floor=d.min_snr_floor,
        label_dropout=d.label_dropout,
        num_classes=config.model.num_classes,
        timestep_sampling=dict(
            sampling=d.timestep_sampling, logit_mean=d.timestep_logit_mean, logit_std=d.timestep_logit_std
        ),
        loss_type=d.loss,
    )
    state_sh = state_shardings(config, mesh, rules)
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(config, mesh, rules), sh.replicated(mesh)),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=(0,),
    )
    return TrainStep(jitted, config.train.num_steps)


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch: video and label, plus text and text_mask (bool) for text models."""
    b = config.train.global_batch_size
    out = {
        "video": jax.ShapeDtypeStruct((b, *config_lib.input_shape(config)), jnp.float32),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32),
    }
    if config.model.text_dim:
        out["text"] = jax.ShapeDtypeStruct((b, config.data.text_len, config.model.text_dim), jnp.float32)
        out["text_mask"] = jax.ShapeDtypeStruct((b, config.data.text_len), jnp.bool_)
    return out


def batch_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> dict[str, Any]:
    """The batch's shardings (every entry split over the data axes), with `batch_shapes`'s keys."""
    return {k: sh.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch_shapes(config).items()}


def logical_context(mesh: jax.sharding.Mesh, rules):
    """The mesh + logical-rules context a sharded step (or sampling loop) runs in."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
