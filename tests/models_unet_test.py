"""The U-Net frame interpolator: shapes over segment lengths, zero output at init, keyframe channels, temporal mixing,
and the same loss on a data x fsdp x tensor mesh of 8 fake devices as on one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import randomize
from vdit_jax.models import unet
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh

CFG = dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), num_heads=2, num_groups=4)


@pytest.fixture(scope="session")
def model():
    cfg = unet.unet_config(**CFG)
    params = nn.unbox(unet.init_params(cfg, jax.random.key(0), (2, 5, 8, 8, 3)))
    return cfg, params


def test_shapes_over_segment_lengths_and_zero_output_at_init(model):
    """Parameters do not depend on the segment length: initialised at 5 frames, the model takes 3 (temporal
    attention; the kernel-3 temporal convolution at 5; the interpolator tests run segments of 5)."""
    conv = unet.unet_config(**CFG, temporal="conv")
    conv_params = nn.unbox(unet.init_params(conv, jax.random.key(0), (1, 5, 8, 8, 3)))
    for cfg, params, frames in [(*model, 3), (conv, conv_params, 5)]:
        x = jax.random.normal(jax.random.key(1), (2, frames, 8, 8, 3))
        mask = jnp.zeros((2, frames), bool).at[:, 0].set(True).at[:, -1].set(True)
        out = jax.jit(unet.UNet(cfg).apply)(params, x, jnp.array([3, 40]), x, mask)
        assert out.shape == x.shape and out.dtype == jnp.float32
        np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv and residual branches


def test_bracket_channels_give_each_frame_its_keyframes_and_time():
    frames = jnp.arange(1.0, 7.0)[None, :, None, None, None] * jnp.ones((2, 6, 2, 2, 1))
    mask = jnp.array([[False, True, False, False, True, False], [True, False, False, False, False, True]])
    c = np.asarray(unet.bracket_channels(frames * mask[:, :, None, None, None], mask))[:, :, 0, 0]
    assert c.shape == (2, 6, 5)  # before, after, has before, has after, alpha
    np.testing.assert_allclose(c[0, :, 0], [0, 2, 2, 2, 5, 5])  # the given frame at or before (0: none)
    np.testing.assert_allclose(c[0, :, 1], [2, 2, 5, 5, 5, 0])  # at or after
    np.testing.assert_allclose(c[0, :, 2:4].T, [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_allclose(c[0, :, 4], [0, 0, 1 / 3, 2 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(c[1, :, 4], [0, 0.2, 0.4, 0.6, 0.8, 0], atol=1e-6)
    none = np.asarray(unet.bracket_channels(frames, jnp.zeros((2, 6), bool)))
    np.testing.assert_array_equal(none, 0.0)


def test_keyframes_enter_as_channels_and_frames_see_each_other(model):
    cfg, params = model
    params = randomize(params, scale=0.1)
    apply = jax.jit(unet.UNet(cfg).apply)
    x = jax.random.normal(jax.random.key(2), (2, 5, 8, 8, 3))
    t = jnp.array([10, 500])
    keys = jax.random.uniform(jax.random.key(3), x.shape, minval=-1, maxval=1)
    none = apply(params, x, t)
    np.testing.assert_allclose(apply(params, x, t, keys, jnp.zeros((2, 5), bool)), none, atol=1e-5)
    ends = jnp.zeros((2, 5), bool).at[:, 0].set(True).at[:, 4].set(True)
    out = apply(params, x, t, keys, ends)
    assert not np.allclose(out, none, atol=1e-4)
    # The last keyframe's content reaches the middle frame, not only its own frame (its bracket channels).
    moved = apply(params, x, t, keys.at[:, 4].add(0.5), ends)
    assert np.abs(moved[:, 2] - out[:, 2]).max() > 1e-4
    # So does another frame's noisy input, through the temporal layers alone.
    moved = apply(params, x.at[:, 4].add(0.5), t, keys, ends)
    assert np.abs(moved[:, 2] - out[:, 2]).max() > 1e-4
    with pytest.raises(ValueError, match="divisible by 2"):
        apply(params, x[:, :, :7, :7], t)
    with pytest.raises(ValueError, match="pass given_frames and frame_mask together"):
        apply(params, x, t, keys)


def test_config_is_validated():
    with pytest.raises(ValueError, match="level width 24 must be divisible by num_groups 16"):
        unet.unet_config(base_channels=24, num_groups=16)
    with pytest.raises(ValueError, match="temporal 'lstm' is not one of"):
        unet.unet_config(temporal="lstm")
    with pytest.raises(ValueError, match=r"attention_levels entry 3 must be in \[0, 3\)"):
        unet.unet_config(attention_levels=(3,))


@pytest.mark.slow
def test_sharded_over_data_fsdp_tensor_matches_one_device(model):
    """The interpolator task's loss (one U-Net forward on the noisy segments, keyframes given) on a data x fsdp x
    tensor mesh of 8 fake devices equals one device's."""
    from tests.helpers import tiny_interpolator_config
    from vdit_jax import tasks

    cfg, params = model
    params = randomize(params, scale=0.1)["params"]
    config = tiny_interpolator_config(frames=3)
    config.model.update(**CFG)
    config.data.video_shape = (3, 8, 8, 3)
    task = tasks.get(config)
    x = jax.random.normal(jax.random.key(4), (4, 3, 8, 8, 3))
    batch = task.prepare_batch({"video": x}, jax.random.key(5))

    def loss(p, batch):
        return task.loss(p, batch, jax.random.key(6))[0]

    single = jax.jit(loss)(params, batch)
    assert float(single) > 0.01  # randomised weights: a loss far from zero, so equality means something
    mesh = mesh_lib.make_mesh({sh.DATA: 2, sh.FSDP: 2, sh.TENSOR: 2}, jax.devices()[:8])
    rules = sh.default_rules()
    boxed = jax.eval_shape(lambda: unet.init_params(cfg, jax.random.key(0), x.shape))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))  # really split
    placed = jax.device_put(params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed_batch = {k: jax.device_put(v, sh.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()}
        sharded = jax.jit(loss)(placed, placed_batch)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
