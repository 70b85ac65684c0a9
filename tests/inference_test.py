"""Loading and sampling a training workdir: the EMA read alone, self-conditioning through `inference.sample` and the
sample CLI. The workdir is written as the trainer writes it (config.json, checkpoints/<step>) without training."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import helpers
from tests.xla_flags import xla_flags
from vdit_jax import inference
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.tasks import dit as dit_task
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """(workdir, the saved state on the host): a tiny self-conditioned model at step 5 whose EMA differs from its
    parameters and whose optimizer state has another structure than the config's optimizer creates (SGD momentum
    instead of clipped AdamW, as from a trainer with another optimizer chain)."""
    config = helpers.tiny_config(self_condition=True)
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(0))
    state = state.replace(
        step=jnp.int32(5),
        ema_params=jax.tree.map(lambda p: 0.5 * p + 0.01, state.params),
        opt_state=optax.sgd(0.1, momentum=0.9).init(state.params),
    )
    path = tmp_path_factory.mktemp("inference") / "run"
    path.mkdir()
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    with ckpt_lib.Checkpointer(path / "checkpoints", async_save=False) as ckpt:
        assert ckpt.save(5, state, config=config, force=True)
    return path, jax.device_get(state)


def test_load_reads_only_the_ema(workdir):
    """The saved EMA bit for bit, on one device, read without the rest of the train state: a restore of the whole
    state would fail on the optimizer state, whose structure is not the config's optimizer's."""
    path, saved = workdir
    config, params, step = inference.load(path)
    assert step == 5 and config.model.self_condition
    chex.assert_trees_all_equal(jax.device_get(params), saved.ema_params)
    assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(params))


def test_sample_feeds_a_self_conditioned_model_its_x0_estimate(workdir, monkeypatch):
    """Every network call of `inference.sample` on a self-conditioned model gets the previous x0 estimate (a model
    called without it would see zeros and still run: only this shows the estimate is passed)."""
    config, params, _ = inference.load(workdir[0])
    seen = []
    real = dit_task._apply_fn

    def spy(model_cfg):
        apply = real(model_cfg)

        def spied(params, x, t, cond, x0_prev=None):
            seen.append(x0_prev is not None and x0_prev.shape == x.shape)
            return apply(params, x, t, cond, x0_prev)

        return spied

    monkeypatch.setattr(dit_task, "_apply_fn", spy)
    videos = inference.sample(config, params, np.array([0, 2]), jax.random.key(0), steps=2)
    assert videos.shape == (2, 4, 8, 8, 3) and videos.dtype == np.uint8
    assert seen and all(seen)


@pytest.mark.slow
def test_sample_cli_on_a_self_conditioned_checkpoint(workdir, tmp_path):
    """`python -m vdit_jax.sample` end to end on the workdir: exit 0 and samples.npz of two RGB videos."""
    out = tmp_path / "samples"
    args = [f"--workdir={workdir[0]}", "--num=2", "--steps=2", f"--out_dir={out}"]
    env = dict(
        os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT
    )  # one CPU device: fast to compile
    proc = subprocess.run(
        [sys.executable, "-m", "vdit_jax.sample", *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        assert f["videos"].shape == (2, 4, 8, 8, 3) and f["videos"].dtype == np.uint8
        assert list(f["prompts"]) == ["class 0", "class 2"]
