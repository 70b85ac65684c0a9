"""The launch scripts: shell syntax, and the gcloud commands `launch/tpu_vm.sh --dry_run` would run."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
COMMON = ["--name=my-pod", "--zone=us-east5-a", "--project=my-proj", "--dry_run"]


def _tpu_vm(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VDIT_")}
    full_env.update(env or {})
    return subprocess.run(["bash", TPU_VM, *args], capture_output=True, text=True, env=full_env, timeout=30)


@pytest.mark.parametrize("script", [TPU_VM, SLURM])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["create", "--accelerator_type=v5p-32", "--runtime_version=v2-alpha-tpuv5", "--spot"],
            ["gcloud compute tpus tpu-vm create my-pod", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
            + ["--zone=us-east5-a", "--project=my-proj", "--spot"],
        ),
        (
            ["create", "--queued", "--accelerator_type=v6e-64", "--runtime_version=v2-alpha-tpuv6e"],
            ["gcloud compute tpus queued-resources create my-pod", "--node-id=my-pod", "--accelerator-type=v6e-64"]
            + ["--runtime-version=v2-alpha-tpuv6e", "--zone=us-east5-a"],
        ),
        (
            ["copy", "--remote_dir=code/vdit"],
            ["tar -czf", "--exclude=./.venv", "gcloud compute tpus tpu-vm scp", "my-pod:vdit_jax_code.tar.gz"]
            + ["--worker=all", "mkdir\\ -p\\ code/vdit"],
        ),
        (["install", "--python=python3.11"], ["tpu-vm ssh my-pod", "--worker=all", "python3.11\\ -m\\ venv", "tpu\\]"]),
        (
            ["run", "--cmd=.venv/bin/python -m vdit_jax.train --config=configs/bench.py:xl_long --workdir=/mnt/r"],
            ["tpu-vm ssh my-pod", "--worker=all", "nohup\\ .venv/bin/python\\ -m\\ vdit_jax.train"]
            + ["--config=configs/bench.py:xl_long", "train.log"],
        ),
        (["logs", "--log=x.log"], ["tpu-vm ssh my-pod", "--worker=0", "tail\\ -n\\ 200\\ -f\\ vdit_jax/x.log"]),
        (["delete"], ["gcloud compute tpus tpu-vm delete my-pod", "--zone=us-east5-a", "--quiet"]),
        (["delete", "--queued"], ["gcloud compute tpus queued-resources delete my-pod", "--force"]),
        (["status", "--queued"], ["gcloud compute tpus queued-resources describe my-pod"]),
    ],
)
def test_tpu_vm_dry_run_prints_the_commands(args, expected):
    proc = _tpu_vm(*args, *COMMON)
    assert proc.returncode == 0, proc.stderr
    for text in expected:
        assert text in proc.stdout, f"{text!r} not in:\n{proc.stdout}"


def test_tpu_vm_settings_from_env_vars():
    env = {"VDIT_TPU_NAME": "env-pod", "VDIT_TPU_ZONE": "europe-west4-b", "VDIT_TPU_WORKER": "3"}
    env["VDIT_TRAIN_CMD"] = "echo hello"
    proc = _tpu_vm("run", "--dry_run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tpu-vm ssh env-pod" in proc.stdout and "--zone=europe-west4-b" in proc.stdout
    assert "--worker=3" in proc.stdout and "echo\\ hello" in proc.stdout
    assert "--project" not in proc.stdout  # not given: gcloud's default project


@pytest.mark.parametrize(
    "args,message",
    [
        (["create", "--name=a", "--zone=z", "--dry_run"], "create needs --accelerator_type"),
        (["run", "--zone=z", "--dry_run"], "--name (or VDIT_TPU_NAME) is required"),
        (["run", "--name=a", "--zone=z", "--dry_run"], "run needs --cmd"),
        (["launch", "--name=a"], "unknown subcommand 'launch'"),
        (["delete", "--name=a", "--zone=z", "--bogus"], "unknown flag '--bogus'"),
    ],
)
def test_tpu_vm_bad_input_is_one_line_and_exit_2(args, message):
    proc = _tpu_vm(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_tpu_vm_help():
    proc = _tpu_vm("--help")
    assert proc.returncode == 0
    for word in ("create", "copy", "install", "run", "logs", "delete", "--dry_run", "VDIT_TPU_NAME", "queued"):
        assert word in proc.stdout


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a real SLURM machine: do not run the batch script")
def test_slurm_script_needs_a_train_command():
    env = {k: v for k, v in os.environ.items() if k not in ("TRAIN_ARGS", "TRAIN_CMD")}
    env["VENV"] = "/nonexistent-venv-is-never-built-before-the-check"
    proc = subprocess.run(["bash", SLURM], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2
    assert "error: set TRAIN_ARGS" in proc.stderr


def _requirements(extra=None):
    """vdit-jax's installed requirements (names, lower case) without an extra marker, or of `extra` only."""
    import importlib.metadata
    import re

    out = set()
    for req in importlib.metadata.requires("vdit-jax") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        marker = re.search(r"extra\s*==\s*[\"']([\w-]+)[\"']", req)
        if (marker.group(1) if marker else None) == extra:
            out.add(name)
    return out


def test_every_install_has_the_video_writers_and_tpu_brings_gcs():
    # tpu_vm.sh installs .[tpu] and the SLURM script .[cuda]: a run with samples needs mediapy / imageio there too,
    # so they are core dependencies; gs:// workdirs need gcsfs (epath) and google-cloud-storage (TensorBoard).
    assert {"mediapy", "imageio", "imageio-ffmpeg"} <= _requirements()
    assert {"gcsfs", "google-cloud-storage"} <= _requirements("tpu")
    with open(TPU_VM) as f:
        assert "pip install -q -e '.[tpu]'" in f.read()
    with open(SLURM) as f:
        assert "install -q '.[cuda]'" in f.read()
