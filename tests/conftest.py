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


@pytest.fixture(scope="session")
def multistage_runs(tmp_path_factory, moving_shapes_dir):
    """(keyframes workdir, interpolator workdir): tests/tiny_config.py's "keyframes" DiT (frames 0, 3, 6) and
    "interpolator" U-Net (segments of 4 frames), 2 steps each, each trained by the trainer CLI on one device. Tests
    that use it share an xdist group ("multistage"), so one worker builds it."""
    root = tmp_path_factory.mktemp("multistage")
    env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = []
    for variant in ("keyframes", "interpolator"):
        cmd = [
            sys.executable,
            "-m",
            "vdit_jax.train",
            f"--config={TINY_CONFIG}:{variant}",
            f"--workdir={root / variant}",
            f"--data_dir={moving_shapes_dir}",
            "--config.train.num_steps=2",
            "--config.train.sample_num=0",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append(root / variant)
    return tuple(out)
