"""The trainer end to end: kill -9 and resume, SIGTERM, a corrupt checkpoint, and train -> sample -> evaluate.

These run the real CLIs in subprocesses on the real (prepared, array_record) moving_shapes 8x32 dataset with a
seconds-scale model from tests/tiny_config.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import imageio
import jax
import numpy as np
import pytest

from tests.conftest import TRAINED, TRAINED_STEPS
from tests.xla_flags import xla_flags
from vdit_jax import cli, inference, sample
from vdit_jax.data import evaluate as evaluate_lib
from vdit_jax.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def data_dir(moving_shapes_dir):
    """moving_shapes 8x32, prepared once per run (tests/conftest.py)."""
    return str(moving_shapes_dir)


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags()  # one CPU device in the subprocesses: fast to compile
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def _cmd(module, *args):
    return [sys.executable, "-m", module, *args]


def _train_cmd(workdir, data_dir, *overrides):
    return _cmd("vdit_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", f"--data_dir={data_dir}", *overrides)


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir)}


def _wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        try:
            if max(_losses(workdir), default=0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.xdist_group("trained")  # one worker builds the `trained_run` fixture (launch/test.sh: loadgroup)
def test_kill9_then_resume_matches_uninterrupted_run(tmp_path, data_dir, trained):
    expected = _losses(trained)  # the uninterrupted run of the same config
    assert sorted(expected) == list(range(1, TRAINED_STEPS + 1))
    broken = tmp_path / "broken"
    victim = subprocess.Popen(
        _train_cmd(broken, data_dir, *TRAINED), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_step(broken, 7, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    done = sorted(int(s) for s in os.listdir(broken / "checkpoints") if s.isdigit())
    assert done and max(done) < TRAINED_STEPS  # interrupted before the end

    proc = _run(_train_cmd(broken, data_dir, *TRAINED))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    resumed = _losses(broken)
    assert sorted(resumed) == list(range(1, TRAINED_STEPS + 1))  # each step once, stale lines of the killed run purged
    for step in range(1, TRAINED_STEPS + 1):
        np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
    # The EMA was restored with the rest (losses alone do not see it): the final EMA parameters are the same.
    (_, ema_resumed, at), (_, ema_clean, _) = inference.load(broken), inference.load(trained)
    assert at == TRAINED_STEPS
    for a, b in zip(jax.tree.leaves(ema_resumed), jax.tree.leaves(ema_clean), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _signal_at_step(workdir, data_dir, sig, step, *overrides):
    """Starts a long run, sends `sig` once `step` is logged, and returns (exit code, stderr)."""
    proc = subprocess.Popen(
        _train_cmd(workdir, data_dir, "--config.train.num_steps=100000", *overrides),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(workdir, step, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    workdir = tmp_path / "run"
    returncode, stderr = _signal_at_step(workdir, data_dir, signal.SIGTERM, 3, "--config.train.checkpoint_every=1000")
    assert returncode == 0, stderr[-3000:]
    saved = re.search(r"SIGTERM: saved a checkpoint at step (\d+) and stopped", stderr)
    assert saved, stderr[-3000:]
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps[-1] == int(saved.group(1)) >= 3
    # Restorable: the sampler's loader reads it (the sample CLI itself runs in the end-to-end test).
    _, ema, at = inference.load(workdir)
    assert at == steps[-1] and all(np.isfinite(a).all() for a in jax.tree.leaves(ema))


@pytest.mark.xdist_group("trained")  # one worker builds the `trained_run` fixture (launch/test.sh: loadgroup)
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, data_dir, trained):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)  # checkpoints 15, 18, 20 (every 3 and the last; 3 kept)
    state_dir = workdir / "checkpoints" / str(TRAINED_STEPS) / "state"
    victims = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs if "ocdbt" in d or f.startswith("d")]
    assert victims
    for path in victims:
        with open(path, "wb") as f:
            f.write(b"garbage")
    end = TRAINED_STEPS + 2
    proc = _run(
        _train_cmd(workdir, data_dir, *TRAINED, f"--config.train.num_steps={end}", "--config.train.sample_num=0")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A regex over the whole stderr, not line starts: when the corrupt read fails, tensorstore's pending reads print
    # "Event loop is closed" tracebacks from their threads (upstream noise), which can interleave with our warning.
    warned = re.search(rf"W\d{{4}} [^\n]*Checkpoint at step {TRAINED_STEPS} in [^\n]* is unreadable", proc.stderr)
    assert warned, proc.stderr[-3000:]
    assert "resumed from step 18" in proc.stderr, proc.stderr[-3000:]
    assert os.path.isdir(workdir / "checkpoints" / f"{TRAINED_STEPS}.corrupt")  # kept for the user, never deleted
    assert max(_losses(workdir)) == end


@pytest.fixture(scope="session")
def trained(trained_run):
    """The finished run of tests/conftest.py (copy it before changing it)."""
    return trained_run


@pytest.mark.xdist_group("trained")  # one worker builds the `trained_run` fixture (launch/test.sh: loadgroup)
def test_train_sample_evaluate_end_to_end(tmp_path, trained):
    workdir = trained
    for name in ("config.json", "metrics.jsonl", "last_metrics.json"):
        assert (workdir / name).exists(), name
    assert os.listdir(workdir / "tb")
    assert (workdir / f"samples/step_{TRAINED_STEPS}/sample_000.mp4").exists()

    out_dir = tmp_path / "samples"
    proc = _run(
        _cmd(
            "vdit_jax.sample",
            f"--workdir={workdir}",
            "--prompt=a red square moving right",
            "--num=3",
            "--steps=4",
            "--guidance=2.0",
            f"--out_dir={out_dir}",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out_dir / "samples.npz")
    assert data["videos"].shape == (3, 8, 32, 32, 3) and data["videos"].dtype == np.uint8
    assert list(data["prompts"]) == ["a red square moving right"] * 3
    assert {f"sample_00{i}.{ext}" for i in range(3) for ext in ("mp4", "gif")} <= set(os.listdir(out_dir))

    # The media files hold the videos of samples.npz in order (mp4 is lossy: sample_001.mp4 is nearer to video 1
    # than to the others; the gif has every frame).
    mp4 = imageio.v3.imread(out_dir / "sample_001.mp4", plugin="FFMPEG", index=None)  # upscaled k times to >= 64 px
    t, h, w, c = data["videos"].shape[1:]
    k = mp4.shape[1] // h
    assert mp4.shape == (t, h * k, w * k, c)
    frames = mp4.reshape(t, h, k, w, k, c).mean(axis=(2, 4))
    err = [np.abs(frames - v).mean() for v in data["videos"]]
    assert np.argmin(err) == 1, err
    assert len(imageio.v3.imread(out_dir / "sample_001.gif", index=None)) == 8

    # The evaluator's CLI prints what the library computes on the same file (the sampled clips are noise after 6
    # steps, so their scores say nothing; tests/data_evaluate_test.py checks the scores on ground truth).
    proc = _run(_cmd("vdit_jax.evaluate", f"--samples={out_dir / 'samples.npz'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics == pytest.approx(evaluate_lib.evaluate(data["videos"], [str(p) for p in data["prompts"]]))
    assert metrics["num_samples"] == 3


@pytest.mark.xdist_group("trained")  # one worker builds the `trained_run` fixture (launch/test.sh: loadgroup)
def test_sample_cli_bad_input_is_one_clear_line(tmp_path, trained):
    """Through the CLI process: exit 2 and one `error:` line naming the value and what is allowed. The other
    values are checked where they enter (`sample.run` raises the `cli.UsageError` that the CLI prints)."""
    proc = _run(
        _cmd(
            "vdit_jax.sample", f"--workdir={trained}", f"--out_dir={tmp_path}", "--prompt=a purple square moving right"
        )
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert re.search("prompt 'a purple square moving right' is not a moving_shapes", last), last
    args = dict(step=None, prompt=None, label=None, num=1, steps=None, sampler=None, eta=None, guidance=None, seed=0)
    for bad, match in [
        (dict(sampler="euler"), "--sampler='euler' is not allowed"),
        (dict(label=99), r"--label=99 is out of range; allowed: 0..83"),
        (dict(steps=0), r"--steps=0 must be in \[1, 50\]"),
    ]:
        with pytest.raises(cli.UsageError, match=match):
            sample.run(trained, out_dir=tmp_path, batch_size=8, **{**args, **bad})


def test_train_cli_bad_config_is_one_clear_line(tmp_path, data_dir):
    proc = _run(_train_cmd(tmp_path / "run", data_dir, "--config.model.patch_size=(3,8,8)"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "patch_size=(3, 8, 8) must divide the video" in proc.stderr.strip().splitlines()[-1]


def _assert_one_line_stop(stderr: str, cause: str, workdir) -> int:
    """The run ended with one `error:` line naming the cause and an existing, complete checkpoint; returns its step."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, stderr[-3000:]
    last = lines[-1]
    match = re.match(r"error: training stopped at step \d+: (.*); last good checkpoint: step (\d+) in (\S+)\.", last)
    assert match, last
    assert cause in match.group(1), last
    ckpt_dir = workdir / "checkpoints"
    assert match.group(3) == str(ckpt_dir)
    names = os.listdir(ckpt_dir)
    assert not [n for n in names if "tmp" in n], names  # the save in flight finished or was never started
    assert match.group(2) in names and (ckpt_dir / match.group(2) / "state").is_dir(), names
    return int(match.group(2))


def test_nonfinite_limit_stops_cleanly_between_logging_steps(tmp_path, data_dir):
    # The reproduction, with logging only every 100 steps: the streak must be seen on the step it happens.
    workdir = tmp_path / "run"
    proc = _run(
        _train_cmd(
            workdir,
            data_dir,
            "--config.train.num_steps=50",
            "--config.train.learning_rate=1e30",
            "--config.train.warmup_steps=0",
            "--config.train.checkpoint_every=1",
            "--config.train.log_every=100",
            "--config.train.max_consecutive_nonfinite=3",
            "--config.train.sample_num=0",
        )
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    saved = _assert_one_line_stop(proc.stderr, "3 updates in a row had a non-finite loss", workdir)
    assert 3 <= saved <= 5, saved  # stopped as soon as the streak reached 3, not at a logging step


def test_ctrl_c_finishes_the_checkpoint_in_flight_and_exits_130(tmp_path, data_dir):
    workdir = tmp_path / "run"
    returncode, stderr = _signal_at_step(workdir, data_dir, signal.SIGINT, 3, "--config.train.checkpoint_every=1")
    assert returncode == 130, stderr[-3000:]
    saved = _assert_one_line_stop(stderr, "interrupted (Ctrl-C)", workdir)
    stopped_at = int(re.search(r"training stopped at step (\d+)", stderr).group(1))
    assert saved == stopped_at >= 3  # the first Ctrl-C ends the step and checkpoints it
    assert (workdir / "metrics.jsonl").read_text().endswith("\n")  # the writers were closed, not torn
