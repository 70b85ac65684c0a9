"""Config validation: each bad value gives one clear ConfigError naming it, before anything compiles."""

import pytest

from configs import moving_shapes
from tests import helpers
from vdit_jax import config as config_lib


def test_shipped_variants_validate():
    for variant in moving_shapes.VARIANTS:
        config_lib.validate(moving_shapes.get_config(variant), num_devices=8)
    with pytest.raises(ValueError, match="unknown moving_shapes variant 'XXL'"):
        moving_shapes.get_config("XXL")


def _set(config, key, value):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize(
    "key,value,devices,match",
    [
        ("model.patch_size", (3, 4, 4), 8, r"patch_size=\(3, 4, 4\) must divide the video"),
        ("train.global_batch_size", 12, 8, r"micro-batch 12 .* divisible by the data axes data x fsdp = 8"),
        ("mesh_shape.fsdp", 3, 8, "do not divide the 8 available devices"),
        ("mesh_shape.tensor", 16, 8, "mesh_shape"),
        ("mesh_shape.pipeline", 2, 8, r"unknown axes \['pipeline'\]"),
        ("sample.sampler", "euler", 1, r"config.sample.sampler='euler' is not allowed; use one of \['ddim', 'ddpm'\]"),
        ("diffusion.schedule", "sigmoid", 1, "config.diffusion.schedule='sigmoid' is not allowed"),
        ("diffusion.prediction", "score", 1, "config.diffusion.prediction='score' is not allowed"),
        ("sample.steps", 5000, 1, r"config.sample.steps=5000 must be in \[1, 100\]"),
        ("model.attention", "sparse", 1, "attention 'sparse' is not one of"),
        ("model.num_heads", 3, 1, "divisible by num_heads"),
        ("model.num_classes", 7, 1, "config.model.num_classes=7 != config.data.num_classes=4"),
        ("model.in_channels", 4, 1, "in_channels=4 != video channels 3"),
        ("data.num_frames", 9, 1, r"config.data.num_frames=9 must be in \[0, 4\]"),
        ("train.grad_accum_steps", 3, 1, "divisible by grad_accum_steps=3"),
        ("train.learning_rate", 0.0, 1, "learning_rate=0.0 must be > 0"),
        ("train.ema_decay", 1.0, 1, r"ema_decay=1.0 must be in \[0, 1\)"),
        ("train.max_consecutive_nonfinite", 0, 1, "config.train.max_consecutive_nonfinite=0 must be >= 1"),
        ("train.keep_checkpoints", 0, 1, "config.train.keep_checkpoints=0 must be >= 1"),
        ("train.sample_num", -1, 1, "config.train.sample_num=-1 must be >= 0"),
        ("train.sample_every", -5, 1, "config.train.sample_every=-5 must be >= 0"),
        ("train.end_lr_fraction", 1.5, 1, r"config.train.end_lr_fraction=1.5 must be in \[0, 1\]"),
        ("train.b2", 1.0, 1, r"config.train.b2=1.0 must be in \[0, 1\)"),
        ("sample.clip_x0", -1.0, 1, r"config.sample.clip_x0=-1.0 must be >= 0 \(0 = no clipping\)"),
        ("sample.fps", 0, 1, "config.sample.fps=0 must be >= 1"),
        ("seed", -1, 1, r"config.seed=-1 must be in \[0, 2\*\*32\)"),
        ("data.frame_stride", 0, 1, "config.data.frame_stride=0 must be >= 1"),
        ("diffusion.label_dropout", 1.5, 1, "label_dropout=1.5"),
        ("diffusion.timestep_sampling", "beta", 1, r"timestep_sampling='beta' is not allowed; use one of \['uniform'"),
        ("diffusion.timestep_logit_std", 0.0, 1, "timestep_logit_std=0.0 must be > 0"),
        ("diffusion.loss", "huber", 1, r"config.diffusion.loss='huber' is not allowed; use one of \['mse', 'l1'\]"),
        ("logical_axis_rules", (("embed", "pipeline"),), 1, "unknown mesh axes"),
    ],
)
def test_validation_errors(key, value, devices, match):
    config = helpers.tiny_config()
    _set(config, key, value)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config, num_devices=devices)


def test_long_skips_with_scan_layers_is_refused():
    config = helpers.tiny_config()
    config.model.update(long_skips=True, scan_layers=True)
    with pytest.raises(config_lib.ConfigError, match="long_skips needs scan_layers=False"):
        config_lib.validate(config, num_devices=1)


def test_sequence_and_tensor_axes_must_divide_tokens_and_heads():
    config = helpers.tiny_config()  # 2 x 2 x 2 = 8 tokens, 2 heads
    config.mesh_shape.update({"data": 1, "sequence": 8})
    config.train.global_batch_size = 8
    config_lib.validate(config, num_devices=8)
    config.mesh_shape.update({"sequence": 1, "tensor": 4, "data": 2})
    with pytest.raises(config_lib.ConfigError, match="num_heads=2 must be divisible by the tensor axis 4"):
        config_lib.validate(config, num_devices=8)


def test_valid_tiny_config_passes():
    config_lib.validate(helpers.tiny_config(), num_devices=8)


def test_moving_shapes_builder_config_must_exist_and_match_the_video_shape():
    c = helpers.tiny_config()
    c.data.name = "moving_shapes"
    c.data.builder_config = "8x32"
    c.data.video_shape = (8, 32, 32, 3)
    c.model.patch_size = (2, 8, 8)
    config_lib.validate(c, 1)
    c.data.video_shape = (8, 16, 16, 3)
    with pytest.raises(config_lib.ConfigError, match=r"video_shape=\(8, 16, 16, 3\) does not match moving_shapes/8x32"):
        config_lib.validate(c, 1)
    c.data.builder_config = "12x24"
    with pytest.raises(config_lib.ConfigError, match=r"config.data.builder_config='12x24' is not allowed; use one of"):
        config_lib.validate(c, 1)


def test_frame_stride_sets_the_input_length_and_its_window_must_fit():
    c = helpers.tiny_config()  # 4 frames, patch 2 in time
    c.data.frame_stride = 2
    assert config_lib.input_shape(c)[0] == 2  # frames 0 and 2: ceil(4 / 2), as the input pipeline cuts them
    config_lib.validate(c, 1)
    c.data.frame_stride = 3
    assert config_lib.input_shape(c)[0] == 2  # frames 0 and 3
    c.data.num_frames = 2
    c.data.frame_stride = 4  # frames 0 and 4 of a 4-frame video
    with pytest.raises(config_lib.ConfigError, match="num_frames=2 with frame_stride=4 needs a window of 5 frames"):
        config_lib.validate(c, 1)
