"""Test set-up: 8 fake CPU devices (must happen before JAX starts its backend) and one persistent XLA compilation
cache for the whole pytest run.

The cache is a fresh temporary directory per run, created by the controlling process and inherited by the xdist
workers and by every subprocess a test starts (the trainer, sampler and multi-process tests compile the same tiny
models again and again: a resumed run or a second process then loads the compiled step instead of recompiling,
e.g. 52 s -> 15 s for the xl_long README command). Set JAX_COMPILATION_CACHE_DIR yourself to keep one across runs.
"""

import fcntl
import os
import subprocess
import sys
import tempfile

import pytest

from tests.xla_flags import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _flag in xla_flags(8).split():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdit_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # at -O0 many compiles take < 0.5 s


def pytest_collection_modifyitems(config, items):
    """End-to-end (`slow`) tests first: with xdist's load balancing the quick ones then fill the gaps at the end
    instead of a long test starting last on an otherwise idle worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def moving_shapes_dir(tmp_path_factory):
    """A data dir with moving_shapes `8x32` prepared once per pytest run and shared by every test that reads it
    (the xdist workers too: the first to ask builds it under a file lock, the other waits and finds it built)."""
    from vdit_jax.data import moving_shapes

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above the per-worker ones
    path = root / "moving_shapes_data"
    path.mkdir(exist_ok=True)
    with open(root / "moving_shapes_data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            moving_shapes.prepare(path, "8x32")  # a no-op once built
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
TRAINED_STEPS = 20
TRAINED = [f"--config.train.num_steps={TRAINED_STEPS}", "--config.train.checkpoint_every=3"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, moving_shapes_dir):
    """A finished run of tests/tiny_config.py (`TRAINED`: 20 steps, a checkpoint every 3, samples at the end), one
    process on one device: the uninterrupted run that the kill -9, corrupt-checkpoint and multi-process tests
    compare with (their losses do not depend on the process or device count, nor on num_steps: the tiny config's
    learning rate is flat after warm-up), and the workdir the sampling test reads. Copy it before changing it.

    Tests that use it share an xdist group ("trained"), so one worker builds it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [
        sys.executable,
        "-m",
        "vdit_jax.train",
        f"--config={TINY_CONFIG}",
        f"--workdir={workdir}",
        f"--data_dir={moving_shapes_dir}",
        *TRAINED,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


OVERFIT_STEPS = 150


@pytest.fixture(scope="session")
def tiny_multistage(tmp_path_factory):
    """The two stages of a tiny pipeline, trained in this process on one device through the one jitted train step,
    each written as a workdir in the trainer's format (config.json and an orbax checkpoint):

      interp_*:   tests/helpers.py's tiny interpolator overfit on 2 rendered 8x8 clips (a batch of 4: each twice,
                  with other gaps drawn), OVERFIT_STEPS steps: `data` uint8 [4, 5, 8, 8, 3], `losses` per step;
      keyframe_*: its tiny keyframe DiT (frames 0, 4, 8 of 9-frame 8x8 videos) with random weights, not trained
                  (the tests that read it check the pipeline's plumbing, not its quality; no train step to compile);
                  text_keyframe_dir: the same DiT on free-text prompts (the built-in text encoder).

    Tests that use it share an xdist group ("multistage"), so one worker builds it."""
    import types

    import jax
    import numpy as np

    from tests import helpers
    from vdit_jax.parallel import mesh as mesh_lib
    from vdit_jax.parallel import sharding as sh
    from vdit_jax.train import checkpoint as ckpt_lib
    from vdit_jax.train import state as state_lib
    from vdit_jax.train import step as step_lib

    root = tmp_path_factory.mktemp("multistage")
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])

    def train(config, batches, workdir):
        rules = sh.rules_from_config(config.logical_axis_rules)
        state = state_lib.create_train_state(config, mesh, rules, jax.random.key(0))
        losses = []
        if batches:
            step = step_lib.make_train_step(config, mesh, rules)
            with step_lib.logical_context(mesh, rules):
                for batch in batches:
                    state, metrics = step(state, batch)
                    losses.append(float(metrics["loss"]))
        else:
            params = helpers.randomize(state.params)
            state = state.replace(params=params, ema_params=params)
        workdir.mkdir()
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
        ckpt.save(len(batches), state, config=config, force=True)
        ckpt.close()
        return jax.device_get(state.ema_params), losses

    interp_config = helpers.tiny_interpolator_config()
    data = np.concatenate([helpers.clips(2, 5)] * 2)
    batch = {"video": jax.numpy.asarray(data, np.float32) / 127.5 - 1.0}
    interp_params, losses = train(interp_config, [batch] * OVERFIT_STEPS, root / "interpolator")
    keyframe_config = helpers.tiny_keyframe_config()
    train(keyframe_config, [], root / "keyframes")
    train(helpers.tiny_text_keyframe_config(), [], root / "text_keyframes")
    return types.SimpleNamespace(
        interp_config=interp_config,
        interp_params=interp_params,
        interp_dir=root / "interpolator",
        data=data,
        losses=losses,
        keyframe_config=keyframe_config,
        keyframe_dir=root / "keyframes",
        text_keyframe_dir=root / "text_keyframes",  # the same, conditioned on free text (built-in encoder)
    )
