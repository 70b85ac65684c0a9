"""The synthetic evaluator: ~1.0 on ground-truth videos at any size, low where the videos don't match, and its CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from vdit_jax import cli
from vdit_jax import evaluate as evaluate_cli
from vdit_jax.data import evaluate as ev
from vdit_jax.data import moving_shapes as ms

METRICS = ("colour_accuracy", "shape_accuracy", "direction_accuracy", "consistency")


@pytest.fixture(scope="session")
def data_dir(moving_shapes_dir):
    """moving_shapes 8x32, prepared once per run (tests/conftest.py)."""
    return str(moving_shapes_dir)


@pytest.fixture(scope="session")
def test_split(data_dir):
    """168 ground-truth videos (uint8 [N, 8, 32, 32, 3]) and captions from the prepared test split."""
    source = ms.data_source(data_dir, "8x32", "test")
    records = [source[i] for i in range(168)]
    return np.stack([r["video"] for r in records]), [r["caption"].decode() for r in records]


def _rendered(num_frames, size, n, seed=0):
    examples = [ms.make_example(seed, "test", i, num_frames, size) for i in range(n)]
    return np.stack([e["video"] for e in examples]), [e["caption"] for e in examples]


def test_ground_truth_scores_about_one(test_split):
    videos, prompts = test_split
    metrics = ev.evaluate(videos, prompts)
    assert metrics["num_samples"] == 168
    for key in METRICS:
        assert metrics[key] >= 0.95, (key, metrics)
    assert metrics["stability"] > 0.8
    assert ev.analyse(videos).captions() == prompts


@pytest.mark.parametrize("num_frames,size", [(16, 32), (16, 64), (8, 16)])
def test_ground_truth_at_other_sizes(num_frames, size):
    videos, prompts = _rendered(num_frames, size, 96)
    metrics = ev.evaluate(videos, prompts)
    for key in METRICS:
        assert metrics[key] >= 0.95, (key, metrics)


def test_wrong_prompts_lower_the_accuracies(test_split):
    videos, prompts = test_split
    permuted = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
    metrics = ev.evaluate(videos, permuted)
    for key in ("colour_accuracy", "shape_accuracy", "direction_accuracy"):
        assert metrics[key] < 0.6, (key, metrics)
    assert metrics["consistency"] >= 0.95  # the videos themselves are still fine

    backwards = ev.evaluate(videos[:, ::-1], prompts)  # time reversed: every direction flips
    assert backwards["direction_accuracy"] == 0.0 and backwards["colour_accuracy"] >= 0.95


def test_noise_and_black_videos_are_inconsistent():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 8, 32, 32, 3), dtype=np.uint8)
    prompts = [ms.caption_for(i % 84) for i in range(64)]
    metrics = ev.evaluate(noise, prompts)
    assert metrics["consistency"] < 0.1 and metrics["stability"] < 0.1

    black = np.zeros((64, 8, 32, 32, 3), np.uint8)
    metrics = ev.evaluate(black, prompts)
    assert all(metrics[key] == 0.0 for key in METRICS)
    assert ev.analyse(black[:2]).captions() == ["", ""]


def test_flicker_and_colour_change_are_inconsistent():
    videos, prompts = _rendered(16, 32, 64)
    flicker = videos.copy()
    flicker[:, 5] = 0  # the object vanishes for a frame
    changing = videos.copy()
    changing[:, 8:] = np.where(changing[:, 8:].max(-1, keepdims=True) > 0, np.uint8(255), np.uint8(0))  # -> white
    assert ev.evaluate(flicker, prompts)["consistency"] == 0.0
    changed_colour = [ms.split_label(ms.parse_caption(p))[0] != "white" for p in prompts]
    assert sum(changed_colour) > 40 and not ev.analyse(changing).consistent[changed_colour].any()


def test_analysis_fields():
    videos, prompts = _rendered(16, 32, 8)
    a = ev.analyse(videos)
    assert a.colour.shape == a.shape.shape == a.direction.shape == (8,) and a.velocity.shape == (8, 2)
    speed = np.abs(a.velocity).max(1)
    assert ((speed > 0.6) & (speed < 1.4)).all()
    assert np.isfinite(a.fill_ratio).all() and (a.stability <= 1).all()


def test_bad_input_is_named():
    videos, prompts = _rendered(8, 32, 4)
    with pytest.warns(UserWarning, match="only 4 samples"):
        ev.evaluate(videos, prompts)
    with pytest.raises(ValueError, match="uint8"):
        ev.evaluate(videos.astype(np.float32), prompts)
    with pytest.raises(ValueError, match="4 videos but 3 prompts"):
        ev.evaluate(videos, prompts[:3])
    with pytest.raises(ValueError, match="a purple square"):
        ev.evaluate(videos, ["a purple square moving left"] * 4)
    with pytest.raises(ValueError, match="at least one sample"):
        ev.evaluate(videos[:0], [])


# ---------------------------------------------------------------- the CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vdit_jax.evaluate", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_prints_metrics_as_json(tmp_path, test_split):
    videos, prompts = test_split
    path = tmp_path / "samples.npz"
    np.savez(path, videos=videos[:70], prompts=np.array(prompts[:70]))
    result = _cli(f"--samples={path}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["num_samples"] == 70
    assert all(metrics[key] >= 0.95 for key in METRICS)


@pytest.mark.parametrize("contents", ["missing", "not_npz", "no_prompts", "bad_prompt", "bad_videos"])
def test_cli_bad_file_is_one_line_and_exit_2(tmp_path, contents):
    """A missing file through the CLI process (exit 2, one `error:` line naming it); the other bad files where they
    enter (`evaluate.run` raises the `cli.UsageError` that the CLI prints as that line)."""
    path = tmp_path / "samples.npz"
    videos, prompts = _rendered(8, 32, 2)
    if contents == "missing":
        result = _cli(f"--samples={path}")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        return
    if contents == "not_npz":
        path.write_text("hello")
    elif contents == "no_prompts":
        np.savez(path, videos=videos)
    elif contents == "bad_prompt":
        np.savez(path, videos=videos, prompts=np.array(["a red blob", "x"]))
    elif contents == "bad_videos":
        np.savez(path, videos=np.zeros((2, 3)), prompts=np.array(prompts))
    with pytest.raises(cli.UsageError) as raised:
        evaluate_cli.run(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_continuations_are_scored_on_their_generated_frames_with_the_seam(tmp_path, test_split):
    """`--num_given=k`: the attributes of frames k.. only (a wrong given part does not count), and the seam from
    frame k - 1 to k (a jump there does)."""
    from vdit_jax import evaluate as cli_lib
    from vdit_jax import video_io

    videos, prompts = test_split
    videos = videos[:64].copy()
    videos[:, :3] = videos[:, :3, :, :, ::-1]  # the given part in other colours
    path = tmp_path / "samples.npz"
    np.savez(path, videos=videos, prompts=np.array(prompts[:64]))
    assert video_io.read_prompts(path) == prompts[:64]
    metrics = cli_lib.run(str(path), given_frames=3)
    assert metrics["colour_accuracy"] >= 0.95 and metrics["direction_accuracy"] >= 0.95
    assert metrics["seam_colour_kept"] < 0.9  # the colour changed at the boundary
    smooth = cli_lib.run(str(path), given_frames=5)  # all of the other-coloured part is "given"; frames 5.. kept
    assert smooth["seam_step_deviation_px"] < ev.SEAM_TOLERANCE_PX and smooth["seam_colour_kept"] == 1.0
    with pytest.raises(ValueError, match=r"--num_given=7 must be in \[1, 6\]"):
        cli_lib.run(str(path), given_frames=7)
