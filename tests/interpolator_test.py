"""The U-Net frame interpolator as a task: its gap masks, its config kind, training through the one train step (a
short overfit beats linear blending), keyframes kept exactly by DDIM and DDPM, shapes over gaps and segment
lengths, and the interpolation metrics and baselines."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from tests import helpers
from vdit_jax import config as config_lib
from vdit_jax import inference, tasks
from vdit_jax.data import evaluate
from vdit_jax.data import moving_shapes as ms
from vdit_jax.tasks import interpolator


def test_gap_masks_give_two_keyframes_and_score_the_frames_between():
    for frames in (3, 6):
        given, between = jax.device_get(interpolator.gap_masks(jax.random.key(frames), 512, frames))
        assert (given.sum(1) == 2).all()
        first = given.argmax(1)
        last = frames - 1 - given[:, ::-1].argmax(1)
        gaps = last - first - 1
        assert set(gaps) == set(range(1, frames - 1))  # every gap 1 .. L - 2 is drawn
        idx = np.arange(frames)[None]
        np.testing.assert_array_equal(between, (idx > first[:, None]) & (idx < last[:, None]))
    assert set(first) == set(range(0, frames - 2))  # every start of the window


def test_the_config_kind_declares_the_unet_and_is_validated():
    from configs import multistage

    config = multistage.get_config("interpolator")
    config_lib.validate(config, num_devices=1)
    assert "depth" not in config.model and config.model.channel_mults == (1, 2, 2)
    back = inference.config_from_json(ml_collections.ConfigDict(json.loads(config.to_json_best_effort())))
    assert interpolator.unet_config(back) == interpolator.unet_config(config)  # tuples survive the JSON round trip
    cases = [
        ("model.depth", 2, r"config.model.depth is not a config key"),
        ("data.num_frames", 2, r"segments \(config.data.num_frames\) need >= 3 frames"),
        ("model.num_groups", 5, r"config.model: UNetConfig: level width 16 must be divisible by num_groups 5"),
        ("model.channel_mults", [1, 2, 2, 2, 2, 2], r"frames of 16x16 must be divisible by 32"),
        ("model.in_channels", 4, r"config.model.in_channels=4 != video channels 3"),
    ]
    for key, value, match in cases:
        bad = multistage.get_config("interpolator")
        section, leaf = key.split(".")
        bad[section][leaf] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(bad, num_devices=1)
    bad = multistage.get_config("interpolator")
    bad.mesh_shape.update(data=1, sequence=2)
    with pytest.raises(config_lib.ConfigError, match="no sequence parallelism: mesh axis sequence=2"):
        config_lib.validate(bad, num_devices=2)
    with pytest.raises(config_lib.ConfigError, match=r"config.model.kind: model kind 'unet' is not one of"):
        config_lib.base_config("unet")


@pytest.mark.xdist_group("multistage")
def test_a_short_overfit_beats_linear_blending(tiny_multistage):
    m = tiny_multistage
    config, params, data, losses = m.interp_config, m.interp_params, m.data, m.losses
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10]), losses[::10]
    task = tasks.get(config)
    first, last, truth = data[:, 0], data[:, 4], data[:, 1:4]
    pred = task.interpolate(params, first, last, 3, jax.random.key(1))
    model = evaluate.frame_quality(pred, truth)
    blend = evaluate.frame_quality(evaluate.blend_frames(first, last, 3), truth)
    assert model["psnr"] > blend["psnr"] + 3, (model, blend)
    scores = task.evaluate(params, clips=data, seed=1)  # what `evaluate --interpolator_run` reports, per gap
    assert set(scores) == {1, 2, 3} and scores[3]["blend"] == blend
    assert scores[3]["model"]["psnr"] > blend["psnr"] + 3


@pytest.mark.xdist_group("multistage")
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_keyframes_are_kept_exactly_and_every_gap_has_its_shape(tiny_multistage, sampler):
    m = tiny_multistage
    config, params, data = m.interp_config, m.interp_params, m.data
    task = tasks.get(config)
    cond = {"given_frames": data.astype(np.float32) / 127.5 - 1.0, "frame_mask": np.zeros((4, 5), bool)}
    cond["frame_mask"][:, [0, 2, 4]] = True  # any mask: three keyframes
    cond["given_frames"][:, 1] = 1.0  # white where not given: must not reach the output
    out = task.sample(params, cond, jax.random.key(2), sampler=sampler, batch_size=2)  # two chunks, one program
    assert out.shape == data.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, [0, 2, 4]], data[:, [0, 2, 4]])  # bit for bit
    assert (out[:, 1] < 255).any()  # generated, not copied
    if sampler == "ddim":
        for gap in (1, 2, 3):  # segments of 2 again: the program compiled above
            got = task.interpolate(params, data[:2, 0], data[:2, gap + 1], gap, jax.random.key(3))
            assert got.shape == (2, gap, helpers.SIZE, helpers.SIZE, 3)
        short = tasks.get(helpers.tiny_interpolator_config(frames=3))  # segments of 3 fill gaps of 1 only
        with pytest.raises(ValueError, match=r"gap=2 must be in \[1, 1\]"):
            short.interpolate(params, data[:2, 0], data[:2, 3], 2, jax.random.key(4))
        with pytest.raises(ValueError, match="guidance=3.0: the interpolator is not guided"):
            task.sample(params, cond, jax.random.key(2), guidance=3.0)


def test_interpolation_metrics_and_baselines():
    data = helpers.clips(6, 5, seed=1, size=16)
    first, last, truth = data[:, 0], data[:, 4], data[:, 1:4]
    exact = evaluate.frame_quality(truth, truth)
    assert exact["psnr"] == evaluate.PSNR_CAP_DB and exact["ssim"] == pytest.approx(1.0, abs=1e-5)
    noisy = np.clip(truth.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((noisy.astype(float) - truth) ** 2).reshape(6, -1).mean(1)
    assert evaluate.frame_quality(noisy, truth)["psnr"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)))
    blend = evaluate.blend_frames(first, last, 3)
    np.testing.assert_array_equal(blend[:, 1], np.round((first.astype(float) + last) / 2).astype(np.uint8))
    nearest = evaluate.nearest_frames(first, last, 3)
    np.testing.assert_array_equal(nearest[:, :2], np.stack([first, first], 1))
    np.testing.assert_array_equal(nearest[:, 2], last)
    with pytest.raises(ValueError, match="uint8 \\[N, G, H, W, C\\] of one shape"):
        evaluate.frame_quality(truth, truth[:, :2])


def test_seams_find_a_jump_and_a_colour_change():
    data = helpers.clips(4, 11, seed=2, size=16)
    steps = [4, 5]
    smooth = evaluate.seams(data, steps)
    assert smooth["seam_free"] == 1.0 and smooth["colour_kept"] == 1.0
    jumped = data.copy()
    jumped[:, 5:] = np.roll(data[:, 5:], 4, axis=3)  # the object jumps 4 px at frame 5 (and wraps: fine here)
    assert evaluate.seams(jumped, steps)["seam_free"] < 1.0
    recoloured = data.copy()
    for clip in recoloured:  # another palette colour from frame 5 on
        fg = clip[5:].max(-1) > evaluate.FOREGROUND_THRESHOLD
        own = clip[0][clip[0].max(-1) > evaluate.FOREGROUND_THRESHOLD][0]
        clip[5:][fg] = ms.PALETTE[1] if (own == ms.PALETTE[0]).all() else ms.PALETTE[0]
    changed = evaluate.seams(recoloured, steps)
    assert changed["colour_kept"] < 1.0 and changed["seam_free"] < 1.0
    with pytest.raises(ValueError, match=r"must be non-empty frame indices in \[0, 9\]"):
        evaluate.seams(data, [10])


@pytest.mark.xdist_group("multistage")
def test_the_benchmark_asks_the_task(tiny_multistage):
    """`vdit_jax.bench`'s sample mode runs the interpolator's sampling step and DDIM loop (no analytic FLOPs: XLA's
    count only); its parameter count comes from the task's init."""
    from vdit_jax import bench
    from vdit_jax.parallel import mesh as mesh_lib
    from vdit_jax.parallel import sharding as sh

    config = tiny_multistage.interp_config  # one device, the sampler compiled by the tests above
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    fields, _ = bench.bench_sample(config, mesh, sh.rules_from_config(config.logical_axis_rules), steps=1)
    assert fields["cfg_batch"] == 4 and fields["model_flops"] is None and fields["xla_flops"] > 0
    assert fields["loop_steps"] == 10 and fields["loop_ms"] > 0 and min(fields["_times"]) > 0
    assert bench.num_tokens(config) is None
    assert bench.param_count(config) == sum(x.size for x in jax.tree.leaves(tiny_multistage.interp_params))
