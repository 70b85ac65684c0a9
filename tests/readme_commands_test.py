"""The README's accelerator examples, run as written at tiny sizes (the sizes overridden, the code path kept).

- Cloud TPU VMs: the `--cmd` of `launch/tpu_vm.sh run` in the README is what `tpu_vm.sh run --dry_run` starts on the
  workers; it trains `configs/bench.py:xl_long` (latent videos + text embeddings, its own mesh data 1 x fsdp 8 x
  sequence on 8 fake devices, scanned and rematerialised blocks in bf16) into `gs://bucket/xl` on a GCS server on
  127.0.0.1 (tests/gcs_emulator.py); it is killed with -9 after a checkpoint, resumed, and sampled from with
  `vdit_jax.sample --workdir=gs://bucket/xl`.
- SLURM: the `TRAIN_ARGS` of the README's sbatch line are what `launch/slurm_gpu.sbatch` (DRY_RUN=1) runs under
  srun; they train `configs/bench.py:S2` (the workdir moved from /shared to a temporary directory).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.gcs_emulator import gcs_server  # noqa: F401  (fixture)
from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme_data")]  # one worker: the shared module fixture

# Tiny sizes for both examples: 2 latent frames of 8x8x4 and 4 text tokens of width 8, a width-32 2-block DiT.
TINY = [
    "--config.data.video_shape=(2,8,8,4)",
    "--config.data.text_len=4",
    "--config.model.text_dim=8",
    "--config.model.hidden_size=32",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.train.log_every=1",
    "--config.sample.steps=2",
    "--config.train.sample_num=2",
]


def _env(devices: int, data_dir, extra=None) -> dict:
    env = dict(os.environ, **(extra or {}))
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        VDIT_DATA_DIR=str(data_dir),  # the README commands use the default (local cache) data dir
    )
    return env


def _python_command(cmd: str) -> list[str]:
    """A README command line with the venv's python replaced by this interpreter."""
    args = shlex.split(cmd)
    assert args[0].endswith("bin/python") and args[1:3] == ["-m", "vdit_jax.train"], args
    return [sys.executable, *args[1:]]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data dir for both examples: the same synthetic_latent_text shapes (TINY), built by the first to run."""
    return tmp_path_factory.mktemp("data")


def test_tpu_vm_example_trains_into_gcs_resumes_and_samples(tmp_path, gcs_server, data_dir):  # noqa: F811
    cmd = re.search(r"bash launch/tpu_vm.sh run \$T --cmd='([^']+)'", README).group(1)
    assert "--config=configs/bench.py:xl_long" in cmd and "--workdir=gs://bucket/xl" in cmd, cmd
    # What `run` starts on every worker is exactly that command.
    dry = subprocess.run(
        ["bash", "launch/tpu_vm.sh", "run", "--name=pod", "--zone=z", f"--cmd={cmd}", "--dry_run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    remote = next(a for a in shlex.split(dry.stdout) if a.startswith("--command=")).removeprefix("--command=")
    assert f"(nohup {cmd} > train.log 2>&1 < /dev/null &)" in remote, remote

    gcs_server.create_bucket("bucket")
    env = _env(8, data_dir, gcs_server.env)
    train = [*_python_command(cmd), *TINY, "--config.train.global_batch_size=8", "--config.train.checkpoint_every=2"]
    log = open(tmp_path / "first.log", "w")
    victim = subprocess.Popen(
        [*train, "--config.train.num_steps=1000"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def committed() -> list[int]:  # finished steps, straight from the server (orbax's commit file on GCS)
        names = gcs_server.list_objects("xl/checkpoints/", bucket="bucket")
        return sorted(
            int(m.group(1)) for n in names if (m := re.fullmatch(r"xl/checkpoints/(\d+)/commit_success.txt", n))
        )

    deadline = time.time() + 300
    while not [s for s in committed() if s >= 2]:
        assert victim.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        assert time.time() < deadline, "no checkpoint >= 2 in gs://bucket/xl within 300 s"
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    resume_from = max(committed())
    end = resume_from + 2

    resumed = subprocess.run(  # no training-time samples: the sample CLI below makes them (one compile less)
        [*train, f"--config.train.num_steps={end}", "--config.train.sample_num=0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {resume_from}" in resumed.stderr, resumed.stderr[-3000:]
    assert "error" not in resumed.stderr.lower().replace("errors", ""), resumed.stderr[-3000:]

    names = gcs_server.list_objects("xl/", bucket="bucket")
    assert end in committed()
    assert "xl/config.json" in names and "xl/last_metrics.json" in names
    assert any(n.startswith("xl/tb/events.out.tfevents") for n in names), names
    lines = gcs_server.read_object("xl/metrics.jsonl", bucket="bucket").decode().splitlines()
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in lines]
    assert steps == list(range(1, end + 1)), steps  # every step once: flushed with each checkpoint, purged on resume

    sample = subprocess.run(
        [sys.executable, "-m", "vdit_jax.sample", "--workdir=gs://bucket/xl", "--num=2", "--steps=2"],
        cwd=ROOT,
        env=_env(1, data_dir, gcs_server.env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    # Samples of a latent model: samples.npz only (no mp4/gif), texts drawn from the dataset.
    names = gcs_server.list_objects("xl/", bucket="bucket")
    assert "xl/samples/samples.npz" in names and not [n for n in names if n.endswith((".mp4", ".gif"))], names
    out = tmp_path / "samples.npz"
    out.write_bytes(gcs_server.read_object("xl/samples/samples.npz", bucket="bucket"))
    data = np.load(out)
    assert data["latents"].shape == (2, 2, 8, 8, 4) and data["latents"].dtype == np.float32
    assert np.isfinite(data["latents"]).all() and len(data["prompts"]) == 2 and all(data["prompts"])


def test_slurm_example_trains(tmp_path, data_dir):
    args = re.search(r"TRAIN_ARGS='([^']+)' sbatch", README).group(1)
    assert args.startswith("--config=configs/bench.py:S2 --workdir="), args
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")  # an existing venv: the script skips its install step
    dry = subprocess.run(
        ["bash", "launch/slurm_gpu.sbatch"],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1", TRAIN_ARGS=args, VENV=str(venv)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    (srun,) = dry.stdout.strip().splitlines()  # no install line: the venv exists
    started = shlex.split(shlex.split(srun)[-1])  # srun ... bash -c "exec CMD"
    assert started[0] == "exec" and started[1:] == [f"{venv}/bin/python", "-m", "vdit_jax.train", *shlex.split(args)]

    workdir = tmp_path / "s2"
    cmd = [sys.executable, *started[2:]]
    cmd = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in cmd]
    # No samples here: the TPU example's test samples the same kind of latent text model (one compile less).
    proc = subprocess.run(
        [
            *cmd,
            *TINY,
            "--config.train.global_batch_size=2",
            "--config.train.num_steps=3",
            "--config.train.sample_num=0",
        ],
        cwd=ROOT,
        env=_env(1, data_dir),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r'"loss": ([0-9.e+-]+)', (workdir / "metrics.jsonl").read_text())]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "3"]  # the first save and the last
