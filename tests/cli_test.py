"""Every command-line tool: `--help` exits 0 and lists the tool's flags; bad input is one `error:` line and exit 2.

Each subprocess pays for importing JAX (seconds), so each test starts all of its tools at once. Bad inputs that
other test files already cover are not repeated here: a bad config value (train_loop_test), bad flag values
(bench_test), bad sample files (data_evaluate_test) and an unknown TPU slice (aot_test).
"""

import os
import subprocess
import sys

import pytest

from vdit_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = "--config=configs/bench.py:tiny"

# Module -> flags its --help must list.
HELP = {
    "vdit_jax.train": ("--config:", "--workdir:", "--data_dir:", "--num_processes:"),
    "vdit_jax.sample": ("--workdir:", "--prompt:", "--label:", "--steps:", "--sampler:", "--pipeline:"),
    "vdit_jax.evaluate": (
        "--samples:",
        "--interpolator_run:",
        "--autoencoder_run:",
        "--keyframe_stride:",
        "--num_given:",
        "--ddim_steps:",
    ),
    "vdit_jax.bench": ("--config:", "--steps:", "--mode:", "--peak_tflops:", "--peer:"),
    "vdit_jax.data.latents": ("--autoencoder:", "--source:", "--name:", "--data_dir:", "--max_examples:"),
    "vdit_jax.aot": ("--config:", "--topology:", "--mesh:", "--max_tries:"),
}


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Runs `python -m MODULE ARGS...` for every entry at once; their results by key."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, cmd in commands.items()
    }
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[key] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_help_exits_0_and_lists_the_flags():
    results = _run_all({module: [module, "--help"] for module in HELP})
    for module, result in results.items():
        assert result.returncode == 0, (module, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (module, result.stderr[-2000:])
        missing = [flag for flag in HELP[module] if flag not in result.stdout]
        assert not missing, (module, missing, result.stdout[-3000:])


def test_bad_input_is_one_error_line_and_exit_2(tmp_path):
    tiny = "--config=tests/tiny_config.py"
    cases = {  # module: (args, what the error line must say)
        "vdit_jax.train": (
            [tiny, f"--workdir={tmp_path / 'run'}", "--config.train.nmu_steps=3"],
            "error: --config.train.nmu_steps=3: unknown config key 'nmu_steps'; did you mean \"num_steps\"",
        ),
        "vdit_jax.sample": (
            [f"--workdir={tmp_path / 'no_run'}"],
            f"error: no checkpoints under '{tmp_path / 'no_run'}'",
        ),
        "vdit_jax.evaluate": ([], "error: give --samples (generated videos), --interpolator_run or --autoencoder_run"),
        "vdit_jax.data.latents": (["--source=moving_shapes/17x32", "--name=x"], "error: --autoencoder is required"),
        "vdit_jax.bench": (
            ["--config=configs/no_such_config.py"],
            "error: --config: could not load the config file: [Errno 2] No such file or directory",
        ),
        # A bad value, not taken for a config that no mesh of the slice suits.
        "vdit_jax.aot": (
            [BENCH, "--topology=v4-8", "--config.model.remat=most"],
            "error: config.model: DiTConfig: remat 'most' is not one of",
        ),
    }
    assert set(cases) == set(HELP)
    results = _run_all({module: [module, *args] for module, (args, _) in cases.items()})
    for module, result in results.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (module, result.returncode, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(cases[module][1]), (module, result.stderr[-2000:])
        assert result.stdout == "", (module, result.stdout[-2000:])
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "error,line",
    [
        (cli.UsageError("--num=0 must be >= 1"), "error: --num=0 must be >= 1"),
        (NotADirectoryError(20, "Not a directory", "/etc/passwd/x"), "Not a directory: '/etc/passwd/x'"),
        (PermissionError(13, "Permission denied", "/root/run"), "Permission denied: '/root/run'"),
    ],
)
def test_run_guarded_turns_user_errors_into_one_line(capsys, error, line):
    def fn():
        raise error

    with pytest.raises(SystemExit) as e:
        cli.run_guarded(fn)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and line in err, err


def test_run_guarded_keeps_the_traceback_of_a_bug():
    def fn():
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        cli.run_guarded(fn)
