"""The keyframes -> interpolation pipeline end to end on a tiny setting (two 2-step runs of tests/tiny_config.py),
through `vdit_jax.pipeline` and the sample and evaluate CLIs, and its errors."""

import json

import jax
import numpy as np
import pytest

from tests import tiny_config
from vdit_jax import cli, evaluate, inference, pipeline, sample
from vdit_jax.data import evaluate as metrics_lib
from vdit_jax.data import moving_shapes

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multistage")]

OPTIONS = dict(
    step=None,
    prompt="a red square moving right",
    label=None,
    num=2,
    steps=2,
    sampler=None,
    eta=None,
    guidance=None,
    seed=3,
    batch_size=8,
    out_dir=None,
)


def test_pipeline_end_to_end_through_the_sample_and_evaluate_clis(multistage_runs, tmp_path, capsys):
    keyframes, interp = multistage_runs
    pipe = pipeline.load(keyframes, interp)
    assert (pipe.stride, pipe.num_keyframes, pipe.num_frames) == (3, 3, 7)
    path = sample.run(
        keyframes,
        **{**OPTIONS, "out_dir": str(tmp_path / "s")},
        pipeline="keyframes+interpolate",
        interpolator=interp,
        interpolation_steps=2,
    )
    with np.load(path) as npz:
        videos, prompts = npz["videos"], npz["prompts"]
    assert videos.shape == (2, 7, 32, 32, 3) and videos.dtype == np.uint8
    assert list(prompts) == ["a red square moving right"] * 2
    # The CLI is the library: the same seed gives the same videos; the keyframes are in them unchanged.
    label = np.full((2,), moving_shapes.parse_caption("a red square moving right"), np.int32)
    out = pipe.generate(label, jax.random.key(3), steps=2, interpolation_steps=2, batch_size=8)
    np.testing.assert_array_equal(out.videos, videos)
    np.testing.assert_array_equal(out.videos[:, ::3], out.keyframes)
    assert out.keyframe_seconds > 0 and out.interpolation_seconds > 0
    assert "keyframes" in capsys.readouterr().out

    result = evaluate.run(path, keyframe_stride=3)
    assert {"colour_accuracy", "seam_seam_free", "seam_step_deviation_px", "seam_colour_kept"} <= set(result)
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1]) == result
    assert "warning: evaluating only 2 samples" in printed.err
    assert metrics_lib.keyframe_steps(7, 3) == [2, 3]


def test_the_interpolator_run_samples_test_clips_and_its_errors(multistage_runs, tmp_path, moving_shapes_dir):
    keyframes, interp = multistage_runs
    path = sample.run(
        interp, **{**OPTIONS, "prompt": None, "out_dir": str(tmp_path / "i")}, data_dir=str(moving_shapes_dir)
    )
    with np.load(path) as npz:
        assert npz["videos"].shape == (2, 4, 32, 32, 3)  # segments: the first and the 4th frame of test clips given
    result = evaluate.run(None, interpolator=str(interp), num=2, data_dir=str(moving_shapes_dir))
    assert set(result["gaps"]) == {"1", "2"}
    for gap in result["gaps"].values():
        assert set(gap) == {"model", "blend", "nearest"} and all(np.isfinite(v["psnr"]) for v in gap.values())
    with pytest.raises(cli.UsageError, match="takes no prompt, label or init video"):
        sample.run(interp, **OPTIONS)
    with pytest.raises(cli.UsageError, match="--pipeline and --interpolator go together"):
        sample.run(keyframes, **OPTIONS, pipeline="keyframes+interpolate")
    with pytest.raises(cli.UsageError, match="--pipeline='frames' is not allowed; use 'keyframes\\+interpolate'"):
        sample.run(keyframes, **OPTIONS, pipeline="frames", interpolator=interp)
    with pytest.raises(cli.UsageError, match="the interpolation stage must be a frame interpolator"):
        sample.run(keyframes, **OPTIONS, pipeline="keyframes+interpolate", interpolator=keyframes)
    k_config, k_params, _ = inference.load(keyframes)
    i_config, i_params, _ = inference.load(interp)
    short = tiny_config.get_config("interpolator")
    short.data.num_frames = 3  # segments of 3 frames cannot fill gaps of 2
    with pytest.raises(
        ValueError, match="segments have 3 frames; gaps of 2 frames between keyframes 3 apart need >= 4"
    ):
        pipeline.Pipeline(k_config, k_params, short, i_params)
    consecutive = tiny_config.get_config("")
    with pytest.raises(ValueError, match="data.frame_stride=1: its frames are consecutive"):
        pipeline.Pipeline(consecutive, k_params, i_config, i_params)
    with pytest.raises(cli.UsageError, match="is a 'dit' run, not a frame interpolator"):
        evaluate.run(None, interpolator=str(keyframes))
