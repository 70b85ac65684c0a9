"""The train state, the optimiser, and initialisation directly into the mesh's shardings."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdit_jax import config as config_lib
from vdit_jax import tasks
from vdit_jax.models import lora


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree of arrays, checkpointed whole.

    `params` are the trained parameters: the whole network, or in a LoRA run (`config.lora.rank > 0`) the adapter
    alone (`models.lora`'s layout); the frozen base is then an argument of the step, never part of the state, so it
    has no gradient, no optimizer state and no EMA, and checkpoints hold the adapter only.
    """

    step: jax.Array  # int32 []
    params: Any
    ema_params: Any  # exponential moving average of params (used for sampling)
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw key data of the run's base key; the step folds in `step`
    nonfinite_total: jax.Array  # int32 []: updates skipped because the loss or gradients were not finite
    nonfinite_streak: jax.Array  # int32 []: skipped in a row (reset by a finite step)


def learning_rate_schedule(tc: ml_collections.ConfigDict, num_steps=None) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over `tc.warmup_steps` (cut to `num_steps - 1`), then cosine decay to
    `end_lr_fraction` of the peak at `num_steps` (default `tc.num_steps`); optax's `warmup_cosine_decay_schedule`.

    `num_steps` may be a traced int32 scalar: the compiled train step then takes the run length as an argument
    instead of a constant, so a resumed run with another `num_steps` (or a second run) reuses the compiled step
    from the persistent cache. (optax's own schedule checks its lengths in Python, so it needs them concrete.)
    """
    total = tc.num_steps if num_steps is None else num_steps
    peak = tc.learning_rate
    end = peak * tc.end_lr_fraction

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        n = jnp.asarray(total, jnp.float32)
        warmup = jnp.minimum(jnp.float32(tc.warmup_steps), n - 1)
        warm = peak * count / jnp.maximum(warmup, 1.0)
        frac = jnp.clip((count - warmup) / jnp.maximum(n - warmup, 1.0), 0.0, 1.0)
        decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def make_optimizer(tc: ml_collections.ConfigDict, num_steps=None) -> optax.GradientTransformation:
    """AdamW with warm-up + cosine decay (`learning_rate_schedule`; `num_steps` may be traced) and global-norm
    clipping."""
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    lr = learning_rate_schedule(tc, num_steps)
    parts.append(optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
    return optax.chain(*parts)


def _init_state(rng: jax.Array, task, tx, batch, lora_cfg) -> TrainState:
    params = task.init(rng, batch)
    if lora_cfg is not None:  # a fresh adapter on the base's (boxed) kernels; the random base itself is unused
        params = lora.init(lora_cfg, params, jax.random.fold_in(rng, 2))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
        nonfinite_total=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> TrainState:
    """NamedShardings of the whole train state, derived from the parameters' logical axis names."""
    boxed = jax.eval_shape(_init_fn(config), jax.random.key(0))
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


def abstract_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint on this mesh."""
    shapes = _unboxed_shapes(jax.eval_shape(_init_fn(config), jax.random.key(0)))
    shardings = state_shardings(config, mesh, rules)
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, shardings)


def _init_fn(config: ml_collections.ConfigDict):
    task = tasks.get(config)
    tx = make_optimizer(config.train)
    batch = task.batch_shapes(config.train.global_batch_size // config.train.grad_accum_steps)  # a micro-batch
    return functools.partial(_init_state, task=task, tx=tx, batch=batch, lora_cfg=config_lib.lora_config(config))


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Any:
    """ShapeDtypeStructs with shardings of the whole network's parameters (a LoRA run's frozen base included):
    the restore target of a base and the step's sharding of it."""
    task = tasks.get(config)
    batch = task.batch_shapes(config.train.global_batch_size // config.train.grad_accum_steps)
    boxed = jax.eval_shape(task.init, jax.random.key(0), batch)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(
        lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), _unboxed_shapes(boxed), shardings
    )


def _unboxed_shapes(boxed):
    """The ShapeDtypeStructs of a boxed `jax.eval_shape` result, unboxed without sharding constraints: `nn.unbox`
    constrains to the mesh in context, which fails on shapes (a sampler loading a model inside a training mesh)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, rng: jax.Array) -> TrainState:
    """Initialises the state straight into its shardings (no full copy on one device first)."""
    shardings = state_shardings(config, mesh, rules)
    init = _init_fn(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    return state


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
