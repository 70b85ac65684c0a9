"""The causal 3D video autoencoder (`vdit_jax.models.autoencoder`): shapes for every compression, strict causality by
perturbation, chunked == whole, tiled == whole within the blend's tolerance (the blend in the output's units), bad
frame counts refused, and its task through the one sharded train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import config as config_lib
from vdit_jax import tasks
from vdit_jax.models import autoencoder as ae
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def _cfg(**kw):
    base = dict(base_channels=8, latent_channels=4, spatial_compression=4, temporal_compression=4, spatial_patch=2)
    base.update(kw)
    stages = max(
        int(np.log2(base["spatial_compression"] // base["spatial_patch"])), int(np.log2(base["temporal_compression"]))
    )
    base.setdefault("channel_mults", (1,) * (stages + 1))
    return ae.AutoencoderConfig(**base)


@pytest.mark.parametrize("s,r,patch", [(4, 1, 1), (4, 4, 1), (8, 1, 2), (8, 4, 2), (4, 4, 4)])
def test_shapes_for_every_compression(s, r, patch):
    cfg = _cfg(spatial_compression=s, temporal_compression=r, spatial_patch=patch)
    video = jax.ShapeDtypeStruct((2, 9, 32, 32, 3), jnp.float32)
    params = nn.unbox(jax.eval_shape(lambda: ae.init_params(cfg, jax.random.key(0), video.shape)))["params"]
    mean, logvar = jax.eval_shape(
        lambda p, v: ae.Autoencoder(cfg).apply({"params": p}, v, method="encode"), params, video
    )
    assert mean.shape == logvar.shape == (2, 1 + 8 // r, 32 // s, 32 // s, 4) == cfg.latent_shape(video.shape)
    out = jax.eval_shape(lambda p, z: ae.Autoencoder(cfg).apply({"params": p}, z, method="decode"), params, mean)
    assert out.shape == video.shape


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    params = nn.unbox(ae.init_params(cfg, jax.random.key(0), (1, 9, 16, 16, 3)))["params"]
    video = jax.random.uniform(jax.random.key(1), (1, 9, 16, 16, 3), minval=-1, maxval=1)
    return cfg, params, video


def test_causal_by_perturbation_and_chunked_equals_whole(model):
    cfg, params, video = model
    mean, logvar = ae.encode(cfg, params, video)
    assert mean.shape == (1, 3, 4, 4, 4)
    for k in (1, 4, 5, 8):  # frame k belongs to latent ceil(k / 4): no latent before it may change
        changed = ae.encode(cfg, params, video.at[:, k].add(0.5))[0]
        moved = np.abs(np.asarray(changed - mean)).max(axis=(0, 2, 3, 4)) > 0
        first = -(-k // 4)
        assert not moved[:first].any() and moved[first], (k, moved)
    recon = ae.decode(cfg, params, mean)
    for j in (1, 2):  # latent j decodes to frames 4j - 3 .. 4j: no frame before them may change
        changed = ae.decode(cfg, params, mean.at[:, j].add(0.5))
        moved = np.abs(np.asarray(changed - recon)).max(axis=(0, 2, 3, 4)) > 0
        assert not moved[: 4 * j - 3].any() and moved[4 * j - 3], (j, moved)

    # Chunks: the first frame, then 4 frames (one latent) at a time, through the causal caches.
    chunked_mean, chunked_logvar = ae.encode(cfg, params, video, chunk_frames=4)
    np.testing.assert_allclose(chunked_mean, mean, atol=1e-5)
    np.testing.assert_allclose(chunked_logvar, logvar, atol=1e-5)
    np.testing.assert_allclose(ae.decode(cfg, params, mean, chunk_latents=1), recon, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_frames=6 must be a positive multiple of the temporal compression 4"):
        ae.encode(cfg, params, video, chunk_frames=6)


def test_bad_frame_counts_are_refused_naming_the_valid_ones(model):
    cfg, params, video = model
    with pytest.raises(
        ValueError,
        match=r"8 frames cannot be encoded with temporal compression 4: it needs 1 \+ 4k "
        r"frames .* e.g. 5 or 9",
    ):
        ae.encode(cfg, params, video[:, :8])
    padded = ae.pad_frames(video[:, :7], 4)
    assert (
        padded.shape[1] == 9
        and np.array_equal(padded[:, 8], video[:, 6])
        and np.array_equal(padded[:, :7], video[:, :7])
    )
    c = config_lib.base_config("video_autoencoder")
    c.data.update(builder_config="16x32", video_shape=(16, 32, 32, 3), label_key="", num_classes=0)
    with pytest.raises(config_lib.ConfigError, match="16 frames cannot be encoded with temporal compression 4"):
        config_lib.validate(c, 1)


def test_tiles_blend_in_the_outputs_units(model):
    # A local map (nearest upsampling by 4): every tile agrees with the whole, so the blend is exact.
    up = lambda z: jnp.repeat(jnp.repeat(z, 4, axis=2), 4, axis=3)  # noqa: E731
    z = jax.random.normal(jax.random.key(2), (1, 2, 12, 12, 3))
    np.testing.assert_allclose(ae.blend_tiles(up, z, tile=6, overlap=2, factor=4), up(z), atol=1e-6)
    # Tiles that disagree by a constant: across an overlap of 2 latent pixels the output ramps over 2 x 4 = 8
    # pixels (the overlap in the output's units), not 2.
    # (Each tile maps to its mean: rows 0-5 of the input are 1, rows 6-9 are 3, so the tiles of rows 0-5 and 4-9
    # give 1 and 7/3.)
    x = jnp.ones((1, 1, 10, 4, 1)).at[:, :, 6:].set(3.0)
    tiled = ae.blend_tiles(lambda t: up(t) * 0 + jnp.mean(t), x, tile=6, overlap=2, factor=4)
    row = np.asarray(tiled[0, 0, :, 0, 0])
    ramp = np.nonzero((row > row.min() + 1e-6) & (row < row.max() - 1e-6))[0]
    assert len(ramp) == 8 and np.all(np.diff(row[ramp]) > 0), row

    # The real decoder: tiles as large as the frame are the whole decode; a bad overlap is refused. (Its error at
    # the seams depends on the trained weights' reach: the README measures it on the trained autoencoder.)
    cfg, params, video = model
    mean, _ = ae.encode(cfg, params, video)
    np.testing.assert_allclose(
        ae.tiled_decode(cfg, params, mean, tile=4, overlap=0), ae.decode(cfg, params, mean), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"overlap=4 must be in \[0, tile=3\)"):
        ae.tiled_decode(cfg, params, mean, tile=3, overlap=4)


def test_autoencoder_task_trains_sharded_through_the_one_step():
    """Three steps of the trainer's step on a data x fsdp x tensor mesh: the convolutions' kernels are split by their
    logical axes and the loss falls."""
    c = config_lib.base_config("video_autoencoder")
    c.data.update(name="random_batches", video_shape=(5, 8, 8, 3), label_key="", num_classes=0)
    c.model.update(base_channels=8, spatial_patch=2, channel_mults=(1, 1, 1), spatial_compression=4)
    c.train.update(global_batch_size=8, warmup_steps=1, learning_rate=3e-3)
    c.mesh_shape.update({"data": 2, "fsdp": 2, "tensor": 2})
    config_lib.validate(c, 8)
    mesh = mesh_lib.make_mesh(c.mesh_shape.to_dict(), jax.devices())
    rules = sh.rules_from_config(c.logical_axis_rules)
    state = state_lib.create_train_state(c, mesh, rules, jax.random.key(0))
    kernel = state.params["decoder"]["mid_res"]["conv1_space"]["conv"]["kernel"]  # [3, 3, in, out]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    step = step_lib.make_train_step(c, mesh, rules)
    video = jax.random.uniform(jax.random.key(1), (8, 5, 8, 8, 3), minval=-1, maxval=1)
    losses = []
    with step_lib.logical_context(mesh, rules):
        for _ in range(3):
            state, m = step(state, {"video": video})
            losses.append(float(m["loss"]))
    assert set(m) >= {"l1", "mse", "kl", "psnr"}
    assert losses[-1] < losses[0], losses
    task = tasks.get(c)
    recon = task.sample(jax.device_get(state.ema_params), {"video": np.zeros((2, 5, 8, 8, 3), np.uint8)}, None)
    assert recon.shape == (2, 5, 8, 8, 3) and recon.dtype == np.uint8
