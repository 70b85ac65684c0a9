"""The task registry: what is trained is looked up by `config.model.kind`, and the one train step serves any task."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import helpers
from vdit_jax import config as config_lib
from vdit_jax import diffusion, tasks
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.tasks import dit as dit_task
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def test_the_dit_is_the_default_kind_and_an_unknown_kind_is_one_clear_error():
    assert "dit" in tasks.kinds()
    config = helpers.tiny_config()
    assert config.model.kind == "dit" and isinstance(tasks.get(config), dit_task.DiTTask)
    config.model.kind = "unet"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.kind: model kind 'unet' is not one of \['dit'"):
        config_lib.validate(config, num_devices=1)


def test_diffusion_settings_travel_as_one_frozen_dataclass():
    config = helpers.tiny_config()
    config.diffusion.update(prediction="x0", label_dropout=0.25, min_snr_gamma=0.0)
    d = config_lib.diffusion_config(config)
    assert (d.prediction, d.cond_dropout, d.min_snr_gamma, d.num_timesteps) == ("x0", 0.25, 0.0, 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.prediction = "v"
    assert hash(d) == hash(config_lib.diffusion_config(config))  # a static jit argument
    assert d.make_schedule().prediction == "x0"


def test_dit_prepare_batch_draws_per_example_and_drops_to_the_null_class():
    config = helpers.tiny_config()
    config.diffusion.label_dropout = 0.5
    task = tasks.get(config)
    batch = helpers.random_batches(config, 1)[0]
    out = task.prepare_batch(batch, jax.random.key(3))
    assert out["t"].shape == (8,) and out["t"].dtype == jnp.int32 and out["noise"].shape == batch["video"].shape
    labels = np.asarray(out["label"])
    dropped = labels == config.model.num_classes
    assert 0 < dropped.sum() < 8  # rate 0.5 over 8 examples with this key: some, not all
    np.testing.assert_array_equal(labels[~dropped], np.asarray(batch["label"])[~dropped])
    assert set(task.batch_shapes(4)) == {"video", "label"}


class _LinearDenoiserTask(tasks.Task):
    """A task that is not a DiT: a per-channel linear x0-predictor of [B, T, H, W, C] videos (one weight and bias
    per channel, no logical axes), trained with the diffusion loss."""

    kind = "test_linear_denoiser"

    @classmethod
    def default_model(cls):
        return ml_collections.ConfigDict()

    def batch_shapes(self, batch_size):
        return {"video": jax.ShapeDtypeStruct((batch_size, *config_lib.input_shape(self.config)), jnp.float32)}

    def init(self, rng, batch):
        c = batch["video"].shape[-1]
        return {"w": jnp.zeros((c,)), "b": jnp.zeros((c,))}

    def prepare_batch(self, batch, rng):
        t_rng, n_rng = jax.random.split(rng)
        video = batch["video"]
        return {
            **batch,
            "t": jax.random.randint(t_rng, video.shape[:1], 0, 100),
            "noise": jax.random.normal(n_rng, video.shape),
        }

    def loss(self, params, batch, rng):
        sched = diffusion.make_schedule("cosine", 100, prediction="x0")
        model_fn = lambda x_t, t: params["w"] * x_t + params["b"]
        per_example, aux = diffusion.loss_fn(model_fn, sched, batch["video"], rng, t=batch["t"], noise=batch["noise"])
        return jnp.mean(per_example), {"mse": jnp.mean(aux["mse"])}

    def sample(self, params, cond, rng, **options):
        raise NotImplementedError

    def sample_conditions(self, data_dir, num, seed):
        raise NotImplementedError


tasks.register(_LinearDenoiserTask)


def test_the_one_train_step_trains_another_task_with_accumulation():
    """Another kind goes through the same jitted step, state and optimizer: its loss falls, and two accumulated
    micro-batches give the full-batch step's update."""
    runs = {}
    for k in (1, 2):
        config = helpers.tiny_config()
        config.model.kind = _LinearDenoiserTask.kind
        config.train.grad_accum_steps = k
        config.train.learning_rate = 0.05
        mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
        rules = sh.rules_from_config(config.logical_axis_rules)
        state = state_lib.create_train_state(config, mesh, rules, jax.random.key(0))
        assert set(state.params) == {"w", "b"}
        step = step_lib.make_train_step(config, mesh, rules)
        rng = np.random.default_rng(0)
        video = jnp.asarray(0.5 * np.sign(rng.normal(size=(8, 4, 8, 8, 3))), jnp.float32)  # +-0.5: learnable
        losses = []
        with step_lib.logical_context(mesh, rules):
            for _ in range(12):
                state, metrics = step(state, {"video": video})
                losses.append(float(metrics["loss"]))
        runs[k] = (losses, jax.device_get(state.params))
    losses, params = runs[1]
    assert losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_allclose(runs[2][0], losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), runs[2][1], params)
