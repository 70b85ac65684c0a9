"""The keyframes -> interpolation pipeline end to end on a tiny setting (tests/conftest.py's `tiny_multistage`: a
keyframe DiT on frames 0, 4, 8 and an interpolator that fills gaps of 3), through `vdit_jax.pipeline` and the sample
and evaluate CLIs, and its errors."""

import json

import jax
import numpy as np
import pytest

from tests import helpers
from vdit_jax import cli, evaluate, inference, pipeline, sample

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multistage")]

OPTIONS = dict(
    step=None,
    prompt=None,
    label=1,
    num=2,
    steps=2,
    sampler=None,
    eta=None,
    guidance=None,
    seed=3,
    batch_size=8,
    out_dir=None,
)


def test_pipeline_end_to_end_through_the_sample_and_evaluate_clis(tiny_multistage, tmp_path, capsys):
    m = tiny_multistage
    pipe = pipeline.load(m.keyframe_dir, m.interp_dir)
    assert (pipe.stride, pipe.num_keyframes, pipe.num_frames) == (4, 3, 9)
    path = sample.run(
        m.keyframe_dir,
        **{**OPTIONS, "out_dir": str(tmp_path / "s")},
        pipeline="keyframes+interpolate",
        interpolator=m.interp_dir,
        interpolation_steps=2,
    )
    with np.load(path) as npz:
        videos, prompts = npz["videos"], npz["prompts"]
    assert videos.shape == (2, 9, helpers.SIZE, helpers.SIZE, 3) and videos.dtype == np.uint8
    assert list(prompts) == ["class 1"] * 2
    assert "keyframes" in capsys.readouterr().out  # the stages' times
    # The CLI is the library: the same seed gives the same videos; the keyframes are in them unchanged.
    out = pipe.generate(np.array([1, 1]), jax.random.key(3), steps=2, interpolation_steps=2, batch_size=8)
    np.testing.assert_array_equal(out.videos, videos)
    np.testing.assert_array_equal(out.videos[:, ::4], out.keyframes)
    assert out.keyframe_seconds > 0 and out.interpolation_seconds > 0

    captioned = tmp_path / "captioned.npz"  # the evaluator reads moving_shapes captions
    np.savez(captioned, videos=videos, prompts=np.array(["a red square moving right"] * 2))
    result = evaluate.run(str(captioned), keyframe_stride=4)
    assert {"colour_accuracy", "seam_seam_free", "seam_step_deviation_px", "seam_colour_kept"} <= set(result)
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1]) == result
    with pytest.raises(cli.UsageError, match=r"--keyframe_stride=5 must be in \[2, 4\] for 9 frames"):
        evaluate.run(str(captioned), keyframe_stride=5)


def test_the_pipeline_refuses_stages_that_do_not_fit(tiny_multistage):
    m = tiny_multistage
    with pytest.raises(cli.UsageError, match="takes no prompt, label or init video"):
        sample.run(m.interp_dir, **OPTIONS)
    with pytest.raises(cli.UsageError, match="--pipeline and --interpolator go together"):
        sample.run(m.keyframe_dir, **OPTIONS, pipeline="keyframes+interpolate")
    with pytest.raises(cli.UsageError, match="--pipeline='frames' is not allowed; use 'keyframes\\+interpolate'"):
        sample.run(m.keyframe_dir, **OPTIONS, pipeline="frames", interpolator=m.interp_dir)
    with pytest.raises(cli.UsageError, match="the interpolation stage must be a frame interpolator"):
        sample.run(m.keyframe_dir, **OPTIONS, pipeline="keyframes+interpolate", interpolator=m.keyframe_dir)
    with pytest.raises(cli.UsageError, match="is a 'dit' run, not a frame interpolator"):
        evaluate.run(None, interpolator=str(m.keyframe_dir))
    with pytest.raises(cli.UsageError, match=r"--ddim_steps=0 must be in \[1, 100\]"):
        evaluate.run(None, interpolator=str(m.interp_dir), steps=0)
    with pytest.raises(cli.UsageError, match="--ddim_steps is for --interpolator_run"):
        evaluate.run("samples.npz", steps=3)
    k_config, k_params, _ = inference.load(m.keyframe_dir)
    short = helpers.tiny_interpolator_config(frames=4)  # segments of 4 frames cannot fill gaps of 3
    with pytest.raises(
        ValueError, match="segments have 4 frames; gaps of 3 frames between keyframes 4 apart need >= 5"
    ):
        pipeline.Pipeline(k_config, k_params, short, m.interp_params)
    consecutive = helpers.tiny_config()
    with pytest.raises(ValueError, match="data.frame_stride=1: its frames are consecutive"):
        pipeline.Pipeline(consecutive, k_params, m.interp_config, m.interp_params)
