"""Frame conditioning: given frames as input channels of the DiT, drawn per example in training, kept exactly when
sampling (DDIM and DDPM), and read from a file by the sample CLI."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vdit_jax import cli, inference, tasks, video_io
from vdit_jax import sample as sample_cli
from vdit_jax.models import dit


def frame_config(**overrides):
    config = helpers.tiny_config(frame_conditioning=True)
    config.update_from_flattened_dict({f"frames.{k}": v for k, v in overrides.items()})
    return config


@pytest.fixture(scope="session")
def random_model():
    """(config, random-weight parameters) of a frame-conditioned tiny DiT: zero-initialised gates made non-zero."""
    config = frame_config()
    task = tasks.get(config)
    params = nn.unbox(jax.jit(lambda rng: task.init(rng, task.batch_shapes(2)))(jax.random.key(0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return config, params


def test_given_frames_enter_as_channels_and_none_is_no_frame(random_model):
    config, params = random_model
    apply = jax.jit(dit.DiT(tasks.get(config).net).apply)
    x = jax.random.normal(jax.random.key(2), (2, 4, 8, 8, 3))
    t, labels = jnp.array([10, 60]), jnp.array([0, 3])
    given = jax.random.uniform(jax.random.key(3), x.shape, minval=-1, maxval=1)
    none = apply({"params": params}, x, t, labels)
    nothing_given = apply({"params": params}, x, t, labels, None, None, None, given, jnp.zeros((2, 4), bool))
    np.testing.assert_allclose(nothing_given, none, atol=1e-6)  # a mask of no frame ignores the frames' values
    first = jnp.zeros((2, 4), bool).at[:, 0].set(True)
    out = apply({"params": params}, x, t, labels, None, None, None, given, first)
    assert not np.allclose(out, none, atol=1e-4)
    other = apply({"params": params}, x, t, labels, None, None, None, given.at[:, 0].add(0.5), first)
    assert not np.allclose(other, out, atol=1e-4)  # the given frame's content reaches the output
    with pytest.raises(ValueError, match="frame_mask must be bool"):
        apply({"params": params}, x, t, labels, None, None, None, given, first.astype(jnp.int32))


def test_training_draws_each_kind_of_conditioning_at_its_rate():
    config = frame_config(rate_none=0.1, rate_first=0.2, rate_prefix=0.3, rate_first_last=0.4, max_prefix=3)
    task = tasks.get(config)
    masks = np.asarray(task.draw_frame_masks(jax.random.key(0), 4000, 4))
    none = ~masks.any(1)
    first = masks[:, 0] & ~masks[:, 1:].any(1)
    prefix = masks[:, 0] & masks[:, 1] & ~masks[:, 3]
    first_last = masks[:, 0] & ~masks[:, 1] & ~masks[:, 2] & masks[:, 3]
    assert (none | first | prefix | first_last).all()  # nothing else is ever drawn
    for kind, rate in ((none, 0.1), (first, 0.2), (prefix, 0.3), (first_last, 0.4)):
        assert abs(kind.mean() - rate) < 0.03, (kind.mean(), rate)
    lengths = masks[prefix].sum(1)
    assert set(lengths.tolist()) == {2, 3}  # k uniform in [2, max_prefix]
    short = np.asarray(tasks.get(frame_config()).draw_frame_masks(jax.random.key(2), 500, 3))  # max_prefix 0
    assert (~short).any(1).all() and short[:, :2].all(1).any()  # a frame to generate always; prefixes of 2 drawn
    batch = helpers.random_batches(config, 1)[0]
    prepared = task.prepare_batch(batch, jax.random.key(1))
    m = np.asarray(prepared["frame_mask"])[:, :, None, None, None]
    np.testing.assert_array_equal(prepared["given_frames"], np.where(m, batch["video"], 0.0))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_keeps_the_given_frames_bit_for_bit(random_model, sampler):
    config, params = random_model
    config = copy.deepcopy(config)
    config.diffusion.num_timesteps = 8  # DDPM walks every step
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
    mask = np.array([[True, True, False, False], [True, False, False, True]])
    given = np.where(mask[:, :, None, None, None], clips.astype(np.float32) / 127.5 - 1.0, 0.0)
    out = inference.sample(
        config, params, np.array([0, 1]), jax.random.key(4), given_frames=given, frame_mask=mask, sampler=sampler
    )
    assert out.shape == clips.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask], clips[mask])
    assert (out[~mask] != clips[~mask]).any()  # the others are generated
    with pytest.raises(ValueError, match="given_frames must be float"):
        inference.sample(config, params, np.array([0]), jax.random.key(4), given_frames=given, frame_mask=mask)


def test_the_loss_scores_every_frame_and_the_given_frames_reach_the_network(random_model):
    """What the train step differentiates: moving a frame's clean target while keeping x_t (and so the network's
    output) fixed changes the loss for a generated frame and for a given one (the sampler evolves every frame, so
    every frame is trained); changing only the given frames' content changes the network's output."""
    config, params = random_model
    task = tasks.get(config)
    prepared = task.prepare_batch(helpers.random_batches(config, 1)[0], jax.random.key(5))
    mask = jnp.zeros((8, 4), bool).at[:, 0].set(True)  # frame 0 given, frames 1-3 generated
    prepared.update(frame_mask=mask, given_frames=prepared["video"] * mask[:, :, None, None, None])
    a = task.sched.sqrt_alphas_cumprod[prepared["t"]][:, None, None, None]
    s = task.sched.sqrt_one_minus_alphas_cumprod[prepared["t"]][:, None, None, None]

    def moved(frame):  # x0 += 0.5 on one frame, eps -= a 0.5 / s there: x_t = a x0 + s eps is unchanged
        video = prepared["video"].at[:, frame].add(0.5)
        noise = prepared["noise"].at[:, frame].add(-a * 0.5 / s)
        return dict(prepared, video=video, noise=noise)

    loss = jax.jit(lambda batch: task.loss(params, batch, jax.random.key(6))[0])
    base = float(loss(prepared))
    assert np.isfinite(base)
    for frame in (0, 2):
        assert abs(float(loss(moved(frame))) - base) > 1e-3 * base
    other = dict(prepared, given_frames=prepared["given_frames"].at[:, 0].multiply(-1.0))
    assert abs(float(loss(other)) - base) > 1e-4 * base


def test_init_video_from_npz_and_upscaled_gif_and_its_errors(tmp_path):
    config = frame_config()
    clips = np.random.default_rng(1).integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8)
    npz = tmp_path / "samples.npz"
    np.savez(npz, videos=clips, prompts=np.array(["a", "b", "c"]))
    given, mask = sample_cli.given_frames_from(config, str(npz), 2, num=2)
    assert given.shape == (2, 4, 8, 8, 3) and mask.tolist() == [[True, True, False, False]] * 2
    np.testing.assert_array_equal(np.round((given[:, :2] + 1) * 127.5).astype(np.uint8), clips[:2, :2])
    # A gif as the sampler writes it (frames upscaled 8x to 64 px) is averaged back to the model's size.
    gif = tmp_path / "clip.gif"
    video_io.write_gif(str(gif), np.repeat(np.repeat(clips[0] // 64 * 64, 2, 1), 2, 2))
    given, mask = sample_cli.given_frames_from(config, str(gif), 1, num=8)
    assert given.shape == (1, 4, 8, 8, 3) and mask.tolist() == [[True, False, False, False]]
    errors = {
        (str(npz), 4): r"--given_frames=4 must be in \[1, 3\]",
        (str(npz), 0): r"--given_frames=0 must be in \[1, 3\]",
        (str(tmp_path / "missing.npz"), 1): "no such file",
        (str(tmp_path / "clip.txt"), 1): "cannot read",
    }
    (tmp_path / "clip.txt").write_text("not a video")
    for (path, k), message in errors.items():
        with pytest.raises(cli.UsageError, match=message):
            sample_cli.given_frames_from(config, path, k, num=1)
    np.savez(tmp_path / "small.npz", videos=clips[:, :, :6, :6])
    with pytest.raises(cli.UsageError, match="has 6x6 frames; the model makes 8x8"):
        sample_cli.given_frames_from(config, str(tmp_path / "small.npz"), 1, num=1)
    with pytest.raises(cli.UsageError, match="needs a model trained with frame conditioning"):
        sample_cli.given_frames_from(helpers.tiny_config(), str(npz), 1, num=1)
