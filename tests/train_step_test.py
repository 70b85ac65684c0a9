"""The sharded train step: same losses on 1 and 8 devices, non-finite updates skipped, accumulation, EMA."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import helpers
from vdit_jax import tasks
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def run_steps(config, devices, batches, mesh_shape=None, history=None):
    """(final state, per-step metrics); `history`, a list, receives host copies of the state before and after each
    step."""
    if mesh_shape is not None:
        config.mesh_shape.update(mesh_shape)
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), devices)
    rules = sh.rules_from_config(config.logical_axis_rules)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(config.seed))
    step = step_lib.make_train_step(config, mesh, rules)
    out = []
    with step_lib.logical_context(mesh, rules):
        for batch in batches:
            if history is not None and not history:
                history.append(jax.device_get(state))
            state, metrics = step(state, batch)
            out.append(jax.device_get(metrics))
            if history is not None:
                history.append(jax.device_get(state))
    return state, out


def test_nonfinite_batch_is_skipped_and_counted():
    config = helpers.tiny_config()
    batches = helpers.random_batches(config, 3)
    batches[1] = dict(batches[1], video=batches[1]["video"].at[0, 0, 0, 0, 0].set(jnp.nan))
    state, metrics = run_steps(config, jax.devices()[:1], batches[:1])
    kept = lambda st: jax.device_get((st.params, st.ema_params, st.opt_state))
    before = kept(state)
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    step = step_lib.make_train_step(config, mesh, rules)
    with step_lib.logical_context(mesh, rules):
        state, bad = step(state, batches[1])
        after_bad = kept(state)
        state, good = step(state, batches[2])
    assert not np.isfinite(bad["loss"]) and float(bad["finite"]) == 0.0
    assert int(bad["nonfinite_total"]) == 1 and int(bad["nonfinite_streak"]) == 1
    # The update was skipped whole: parameters, EMA and optimizer state (Adam moments and count) unchanged.
    jax.tree.map(np.testing.assert_array_equal, before, after_bad)
    assert int(good["nonfinite_total"]) == 1 and int(good["nonfinite_streak"]) == 0
    assert int(state.step) == 3 and np.isfinite(good["loss"])


def test_gradient_accumulation_and_ema():
    """The EMA update rule, step by step: ema' = d * ema + (1 - d) * params' with d = min(ema_decay, (1 + step) /
    (10 + step)) at the step's index; ema_decay = 0.2 makes both sides of the min count (d = 0.1, 2/11, 0.2)."""
    config = helpers.tiny_config(self_condition=True)  # the self-conditioned step (a second pass on half the steps)
    config.train.update(grad_accum_steps=2, learning_rate=1e-2, warmup_steps=0, ema_decay=0.2)
    history = []
    state, metrics = run_steps(config, jax.devices()[:1], helpers.random_batches(config, 3), history=history)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # The config's self_condition reached the model: x0 estimate beside x, so twice the patch width in.
    pt, ph, pw = config.model.patch_size
    assert state.params["patch_embed"]["kernel"].shape[0] == 2 * pt * ph * pw * 3
    gap = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for before, after in zip(history, history[1:]):
        step = int(before.step)
        decay = np.float32(min(0.2, (1 + step) / (10 + step)))
        expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, before.ema_params, after.params)
        chex.assert_trees_all_close(after.ema_params, expected, rtol=1e-6, atol=1e-7)
        # Each step tests the rule on an update far above the tolerance (a decay off by 0.01 shows).
        assert gap(before.ema_params, after.params) > 1e-3, step


@pytest.mark.slow
def test_accumulated_micro_batches_stay_on_their_data_devices():
    """grad_accum_steps=2 on data=4: micro-batch i holds examples i, i + 2, ..., so it spans all four devices as the
    global batch does, and the only collective of the compiled step is the gradient all-reduce (a contiguous split
    put each micro-batch on two devices: collective-permutes and all-gathers of the videos in the scan). The update
    is still the full-batch one."""
    batches = helpers.random_batches(helpers.tiny_config(), 2)
    full_state, full = run_steps(helpers.tiny_config(), jax.devices()[:1], batches)
    config = helpers.tiny_config()
    config.train.grad_accum_steps = 2
    config.mesh_shape.update({"data": 4})
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), jax.devices()[:4])
    rules = sh.rules_from_config(config.logical_axis_rules)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(config.seed))
    with step_lib.logical_context(mesh, rules):
        compiled = step_lib.make_train_step(config, mesh, rules).lower(state, batches[0]).compile()
        metrics = []
        for batch in batches:
            state, m = compiled(state, batch, config.train.num_steps, None)  # no LoRA base
            metrics.append(jax.device_get(m))
    hlo = compiled.as_text()
    collectives = set(
        re.findall(r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
    )
    assert collectives == {"all-reduce"}
    for a, b in zip(full, metrics, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    chex.assert_trees_all_close(state.params, full_state.params, atol=1e-5)


def test_config_loss_and_timestep_sampling_reach_the_objective():
    """What the step differentiates is the task's loss of `config.diffusion`: diffusion.loss = l1 is the absolute
    error (MSE still reported); logit-normal timesteps (mean -2: clean steps) change the drawn timesteps and so the
    loss of the same batch and parameters. (The step itself adds only accumulation and the update: tested above.)"""
    batch = helpers.random_batches(helpers.tiny_config(), 1)[0]

    def evaluate(**diffusion):
        config = helpers.tiny_config()
        config.diffusion.update(min_snr_gamma=0.0, **diffusion)
        task = tasks.get(config)
        params = jax.device_get(task.init(jax.random.key(0), task.batch_shapes(8)))
        params = jax.tree.map(lambda p: p + 0.05, nn.unbox(params))  # zero-initialised gates: non-zero output
        rng = jax.random.key(1)
        prepared = task.prepare_batch(batch, rng)
        loss, metrics = jax.jit(task.loss)(params, prepared, rng)
        return float(loss), float(metrics["mse"]), np.asarray(prepared["t"])

    loss, mse, t = evaluate()
    np.testing.assert_allclose(loss, mse, rtol=1e-6)  # plain MSE: loss == mse
    l1_loss, l1_mse, l1_t = evaluate(loss="l1")
    np.testing.assert_array_equal(l1_t, t)
    np.testing.assert_allclose(l1_mse, mse, rtol=1e-5)  # same prediction, same MSE
    assert not np.isclose(l1_loss, l1_mse)
    assert helpers.tiny_config().diffusion.timestep_sampling == "uniform"  # so `t` above is the uniform draw
    _, logit_mse, logit_t = evaluate(timestep_sampling="logit_normal", timestep_logit_mean=-2.0)
    assert logit_t.mean() < t.mean() and not np.isclose(logit_mse, mse)


def test_batch_shapes_carry_the_text_mask_of_text_models():
    config = helpers.tiny_config()
    assert set(step_lib.batch_shapes(config)) == {"video", "label"}
    config.model.text_dim, config.data.text_len = 16, 6
    shapes = step_lib.batch_shapes(config)
    assert shapes["text"] == jax.ShapeDtypeStruct((8, 6, 16), jnp.float32)
    assert shapes["text_mask"] == jax.ShapeDtypeStruct((8, 6), jnp.bool_)
    mesh = mesh_lib.make_mesh({"data": 8}, jax.devices())
    shardings = step_lib.batch_shardings(config, mesh, sh.rules_from_config(config.logical_axis_rules))
    assert shardings["text_mask"].spec[0] in ("data", ("data", "fsdp"))  # split over the batch like the rest


@pytest.mark.parametrize(
    "warmup,num_steps,end_fraction", [(5, 100, 0.1), (0, 10, 0.0), (50, 20, 1.0), (3, 4, 0.5), (1, 1, 0.1)]
)
def test_learning_rate_schedule_is_optax_warmup_cosine(warmup, num_steps, end_fraction):
    """Ours takes a traced run length; its values are optax's `warmup_cosine_decay_schedule` (warm-up cut to
    num_steps - 1), past the end too."""
    tc = helpers.tiny_config().train
    tc.update(num_steps=num_steps, warmup_steps=warmup, learning_rate=1e-3, end_lr_fraction=end_fraction)
    cut = min(warmup, num_steps - 1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, cut, max(num_steps, cut + 1), 1e-3 * end_fraction)
    counts = np.arange(num_steps + 3)
    ours = jax.jit(lambda n: jax.vmap(state_lib.learning_rate_schedule(tc, n))(counts))(num_steps)
    np.testing.assert_allclose(ours, [ref(c) for c in counts], rtol=1e-5, atol=1e-12)


def test_run_length_is_an_argument_of_the_compiled_step():
    """Two runs that differ only in num_steps lower to the same program (a resumed, longer run hits the persistent
    compilation cache) and the schedule still follows each run's length."""
    texts = []
    for num_steps in (20, 1000):
        config = helpers.tiny_config()
        config.train.num_steps = num_steps
        mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
        rules = sh.rules_from_config(config.logical_axis_rules)
        state = state_lib.abstract_state(config, mesh, rules)
        batch = helpers.random_batches(config, 1)[0]
        step = step_lib.make_train_step(config, mesh, rules)
        assert step.num_steps == num_steps
        with step_lib.logical_context(mesh, rules):
            texts.append(step.lower(state, batch).as_text())
    assert texts[0] == texts[1]
