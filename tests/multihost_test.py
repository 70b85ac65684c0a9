"""Multi-process training on one machine: 2 processes on 127.0.0.1 with fake CPU devices (gloo collectives).

One 2-process run is killed (`kill -9` of process 1) after a checkpoint: process 0 must stop by itself, non-zero,
with a clear message, well within a minute. The run then resumes on a different device count and mesh (2 processes
x 1 device instead of 2 x 2) and must reproduce the losses of an uninterrupted reference run, while process 0 alone
writes training-time samples; then SIGTERM to one of the two makes both save the same step and exit 0. The process
count stays 2: each process's data-iterator position is saved separately (see vdit_jax.train.__main__).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import TRAINED_STEPS
from tests.xla_flags import xla_flags
from vdit_jax.parallel import distributed
from vdit_jax.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
# (tests/tiny_config.py has a flat learning rate after warm-up: a run's length does not change its losses.)
COMMON = ["--config.train.sample_num=0", "--config.train.keep_checkpoints=20"]
PEER_DEATH_MESSAGES = ("another process most likely died", "another task died")


@pytest.fixture(scope="session")
def data_dir(moving_shapes_dir):
    """moving_shapes 8x32, prepared once per run (tests/conftest.py)."""
    return str(moving_shapes_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    for key in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        env.pop(key, None)
    return env


def _train_cmd(workdir, data_dir, *args):
    return [
        sys.executable,
        "-m",
        "vdit_jax.train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--data_dir={data_dir}",
        *COMMON,
        *args,
    ]


def _launch(workdir, data_dir, *args, devices, port, processes=(0, 1), num_processes=2, tag=""):
    """Starts processes of one run; the output of process i goes to workdir<tag>.p<i>.log."""
    procs = []
    for i in processes:
        cmd = _train_cmd(
            workdir,
            data_dir,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
            "--heartbeat_timeout_s=10",
            "--initialization_timeout_s=60",
            *args,
        )
        log = open(f"{workdir}{tag}.p{i}.log", "w")
        procs.append(subprocess.Popen(cmd, env=_env(devices), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _log(workdir, i, tag="") -> str:
    with open(f"{workdir}{tag}.p{i}.log") as f:
        return f.read()


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir)}


def _finished_checkpoints(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def _wait_until(done, workdir, procs, what: str, timeout=180, tag=""):
    """Polls `done()` while both processes run; fails with their logs if one exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            logs = [_log(workdir, i, tag)[-3000:] for i in (0, 1)]
            raise AssertionError("a process exited early:\n" + "\n".join(logs))
        try:
            if done():
                return
        except (OSError, ValueError):  # a file being written
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout} s")


def _wait_for_checkpoint(workdir, step, procs):
    _wait_until(lambda: any(s >= step for s in _finished_checkpoints(workdir)), workdir, procs, f"checkpoint {step}")


REFERENCE_STEPS = TRAINED_STEPS


@pytest.fixture(scope="session")
def reference(trained_run) -> dict[int, float]:
    """The uninterrupted reference as step -> loss: tests/conftest.py's trained run of the same config, one process
    on one device (the global batches are the same for any process count)."""
    expected = _losses(trained_run)
    assert sorted(expected) == list(range(1, REFERENCE_STEPS + 1))
    return expected


@pytest.mark.xdist_group("trained")  # one worker builds tests/conftest.py's `trained_run`
@pytest.mark.slow
def test_kill_one_process_then_resume_on_another_mesh_then_sigterm_one(tmp_path, data_dir, reference):
    expected = reference

    # 2 processes x 2 devices (data 2 x fsdp 2); kill -9 process 1 once step 4 is checkpointed.
    run = tmp_path / "run"
    procs = _launch(
        run,
        data_dir,
        "--config.train.num_steps=1000",
        "--config.train.checkpoint_every=2",
        "--config.mesh_shape.fsdp=2",
        devices=2,
        port=_free_port(),
    )
    try:
        _wait_for_checkpoint(run, 4, procs)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0].wait(timeout=60)
        stopped_after = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    survivor = _log(run, 0)
    print(f"process 0 stopped {stopped_after:.1f} s after process 1 was killed")
    assert rc != 0
    assert stopped_after < 60
    assert any(m in survivor for m in PEER_DEATH_MESSAGES), survivor[-3000:]
    before = _losses(run)
    for step in sorted(before):
        np.testing.assert_allclose(before[step], expected[step], rtol=1e-5, err_msg=f"step {step} (2 x 2 devices)")

    # Resume on 2 processes x 1 device (mesh data 2), with training-time samples every 3 steps (process 0 alone);
    # SIGTERM reaches one host of two: JAX's preemption sync point makes both save the same step and exit 0.
    resume_from = max(_finished_checkpoints(run))
    assert 4 <= resume_from <= 10
    first_samples = run / "samples" / f"step_{(resume_from // 3 + 1) * 3}" / "samples.npz"
    procs = _launch(
        run,
        data_dir,
        "--config.train.num_steps=1000",
        "--config.train.checkpoint_every=1000",
        "--config.train.sample_every=3",
        "--config.train.sample_num=2",
        devices=1,
        port=_free_port(),
        tag=".resume",
    )
    try:
        _wait_until(
            lambda: first_samples.exists() and max(_losses(run)) >= resume_from + 2,
            run,
            procs,
            f"samples {first_samples}",
            timeout=240,
            tag=".resume",
        )
        procs[1].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [_log(run, i, ".resume") for i in (0, 1)]
    assert rcs == [0, 0], f"{logs[0][-3000:]}\n{logs[1][-3000:]}"
    assert f"resumed from step {resume_from}" in logs[0]
    saved = [int(m) for m in re.findall(r"preemption: saved a checkpoint at step (\d+)", "\n".join(logs))]
    assert len(saved) == 2 and saved[0] == saved[1], saved  # both processes, the same step
    stop = saved[0]
    assert resume_from + 2 <= stop <= REFERENCE_STEPS, stop
    assert max(_finished_checkpoints(run)) == stop
    samples = np.load(first_samples)
    assert samples["videos"].shape == (2, 8, 32, 32, 3) and len(samples["prompts"]) == 2
    after = _losses(run)  # every step once (the killed run's unsaved steps purged), as one uninterrupted process
    assert sorted(after) == list(range(1, stop + 1))
    for step in range(resume_from + 1, stop + 1):
        np.testing.assert_allclose(after[step], expected[step], rtol=1e-5, err_msg=f"step {step} (2 x 1 devices)")


def test_unreachable_coordinator_is_one_clear_error(tmp_path):
    # Process 1 of 2 alone: no coordinator ever answers.
    (proc,) = _launch(
        tmp_path / "run",
        tmp_path / "data",
        "--initialization_timeout_s=3",
        devices=1,
        port=_free_port(),
        processes=(1,),
    )
    t0 = time.time()
    rc = proc.wait(timeout=90)
    log = _log(tmp_path / "run", 1)
    assert rc == 2, log[-3000:]
    assert time.time() - t0 < 60
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 could not start the distributed runtime"), last
    assert "127.0.0.1" in last


def test_settings_from_flags_and_env():
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4"}
    s = distributed.settings_from({"process_id": 3, "heartbeat_timeout_s": 20}, env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.heartbeat_timeout_s) == ("10.0.0.1:1234", 4, 3, 20)
    assert distributed.detect_environment(s, env={}) == "explicit"
    # A flag wins over the env var; -1 / None / '' count as not given.
    s = distributed.settings_from({"num_processes": 2, "process_id": -1}, env={distributed.ENV_PROCESS_ID: "1"})
    assert (s.num_processes, s.process_id) == (2, 1)


def test_detect_environment():
    none = distributed.Settings()
    assert distributed.detect_environment(none, env={}) in ("single", "tpu")  # tpu only on a TPU VM
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "3"}
    assert distributed.detect_environment(none, env=slurm) == "slurm"
    assert distributed.detect_environment(none, env=dict(slurm, SLURM_NTASKS="1")) != "slurm"
    assert distributed.detect_environment(distributed.Settings(num_processes=1), env=slurm) == "single"
    with pytest.raises(distributed.DistributedError, match=r"missing \['process_id'\]"):
        distributed.detect_environment(distributed.Settings(coordinator_address="h:1", num_processes=2), env={})
    with pytest.raises(distributed.DistributedError, match="must be host:port"):
        distributed.detect_environment(distributed.Settings("nohost", 2, 0), env={})
    with pytest.raises(distributed.DistributedError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed.detect_environment(distributed.Settings("h:1", 2, 2), env={})
