"""The pure train step and its jitted, sharded form, the same for every task (`vdit_jax.tasks`).

`train_step(state, batch, num_steps, base, *, task, tc, lora_cfg) -> (state, metrics)` is a module-level pure
function: the task gives the per-example draws (`prepare_batch`) and the objective (`loss`); the step adds gradient
accumulation, the optimiser, the EMA and the skip of non-finite updates. In a LoRA run `state.params` is the adapter
and `base` the frozen network it is merged into inside the loss (`models.lora.merge`), so only the adapter is
differentiated, clipped, averaged and checked for non-finite values.
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
from vdit_jax import tasks
from vdit_jax.models import lora
from vdit_jax.parallel import sharding as sh
from vdit_jax.train.state import TrainState, abstract_params, make_optimizer, state_shardings

# The task's batch fields (`Task.batch_shapes`), e.g. for the DiT {"video": float32 [B, T, H, W, C], "label": int32
# [B], and for text models "text" float32 [B, L, D] and "text_mask" bool [B, L]}.
Batch = dict[str, jax.Array]


def train_step(
    state: TrainState,
    batch: Batch,
    num_steps: jax.Array | int,
    base: Any = None,
    *,
    task: tasks.Task,
    tc: ml_collections.ConfigDict,
    lora_cfg: lora.LoraConfig | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update from one global batch (split into `tc.grad_accum_steps` micro-batches).

    The task's per-example draws (timesteps, noise, condition dropout) are made for the whole global batch before
    it is split, and every micro-batch's loss gets the step's key, so an accumulated step computes the same
    gradient as one full-batch step. `num_steps` is the run's length for the learning-rate schedule
    (`state.make_optimizer`), an argument rather than a constant of the compiled step: runs that differ only in
    their length share one compiled step.

    With `lora_cfg`, `state.params` is an adapter and `base` the network's frozen parameters (a step argument,
    not a constant of the compiled program): the loss is the task's on `lora.merge(base, adapter)`.

    Metrics: "loss", the task's metrics (e.g. "mse"), "grad_norm", "finite" (1.0 / 0.0), "nonfinite_total",
    "nonfinite_streak".
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = task.prepare_batch(batch, rng)
    loss_fn = task.loss
    if lora_cfg is not None:

        def loss_fn(adapter, micro, key):
            return task.loss(lora.merge(base, [(lora_cfg, adapter, 1.0)]), micro, key)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = tc.grad_accum_steps
    if k == 1:
        (loss, task_metrics), grads = grad_fn(state.params, batch, rng)
    else:

        def split(a):  # [B, ...] -> [k, B / k, ...]: micro-batch i holds examples i, i + k, i + 2k, ...
            # Strided, not contiguous: each device's rows of the batch go to every micro-batch in equal parts, so
            # every micro-batch spans all data devices as the batch did and the split moves nothing between them.
            a = a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(a, (None, sh.BATCH) + (None,) * (a.ndim - 2))

        def accumulate(carry, micro):
            out, g = grad_fn(state.params, micro, rng)
            return jax.tree.map(jnp.add, carry, (out, g)), None

        shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda a: a[: a.shape[0] // k], batch), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((loss, task_metrics), grads), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, batch))
        loss, task_metrics, grads = jax.tree.map(lambda a: a / k, (loss, task_metrics, grads))

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
        **task_metrics,
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
    compilation cache instead of compiling again). So does a LoRA run's frozen base (`base`).
    """

    def __init__(self, jitted, num_steps: int, base: Any = None):
        self.jitted = jitted
        self.num_steps = num_steps
        self.base = base

    def __call__(self, state: TrainState, batch: Batch):
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.base)):
            raise ValueError("this LoRA train step was made without its base parameters (make_train_step's `base`)")
        return self.jitted(state, batch, self.num_steps, self.base)

    def lower(self, state, batch) -> jax.stages.Lowered:
        return self.jitted.lower(state, batch, self.num_steps, self.base)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, base: Any = None) -> TrainStep:
    """The jitted, sharded train step of `config` (a `TrainStep`).

    A LoRA run (`config.lora.rank > 0`) trains an adapter on `base`, the frozen parameters (arrays on the mesh, as
    `state.abstract_params` shards them); without them the step can only be lowered (`TrainStep.lower`).
    Call it inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (as `loop.train` does).
    """
    lora_cfg = config_lib.lora_config(config)
    step = functools.partial(train_step, task=tasks.get(config), tc=config.train, lora_cfg=lora_cfg)
    state_sh = state_shardings(config, mesh, rules)
    base_sh = None
    if lora_cfg is not None:
        abstract = abstract_params(config, mesh, rules)
        base_sh = jax.tree.map(lambda a: a.sharding, abstract)
        base = abstract if base is None else base
    elif base is not None:
        raise ValueError("`base` is for LoRA runs (config.lora.rank > 0)")
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(config, mesh, rules), sh.replicated(mesh), base_sh),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=(0,),
    )
    return TrainStep(jitted, config.train.num_steps, base)


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch: the fields the config's task reads (`Task.batch_shapes`)."""
    return tasks.get(config).batch_shapes(config.train.global_batch_size)


def batch_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> dict[str, Any]:
    """The batch's shardings (every entry split over the data axes), with `batch_shapes`'s keys."""
    return {k: sh.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch_shapes(config).items()}


def logical_context(mesh: jax.sharding.Mesh, rules):
    """The mesh + logical-rules context a sharded step (or sampling loop) runs in."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
