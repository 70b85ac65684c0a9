"""Config validation: each bad value gives one clear ConfigError naming it, before anything compiles."""

import re

import ml_collections
import pytest

from configs import autoencoder as autoencoder_configs
from configs import latent as latent_configs
from configs import lora as lora_configs
from configs import moving_shapes
from configs import multistage as multistage_configs
from configs import text as text_configs
from tests import helpers
from vdit_jax import config as config_lib
from vdit_jax.models import layers


def test_shipped_variants_validate():
    for variant in moving_shapes.VARIANTS:
        config_lib.validate(moving_shapes.get_config(variant), num_devices=8)
    with pytest.raises(ValueError, match="unknown moving_shapes variant 'XXL'"):
        moving_shapes.get_config("XXL")
    for variant in text_configs.VARIANTS:  # the text-to-video demo (README): 64 tokens, as the class demo has
        config = text_configs.get_config(variant)
        config_lib.validate(config, num_devices=1)
        assert layers.token_grid((1, *config.data.video_shape), config.model.patch_size) == (4, 4, 4)
    for variant in multistage_configs.VARIANTS:
        config_lib.validate(multistage_configs.get_config(variant), num_devices=1)
    for variant in autoencoder_configs.VARIANTS:
        config_lib.validate(autoencoder_configs.get_config(variant), num_devices=1)
    for variant in latent_configs.VARIANTS:
        config_lib.validate(latent_configs.get_config(variant), num_devices=1)
    base, adapter = lora_configs.get_config("base"), lora_configs.get_config("lora")
    config_lib.validate(base, num_devices=1)
    adapter.lora.base_workdir = "runs/base"
    config_lib.validate(adapter, num_devices=1)
    held = set(lora_configs.held_out_labels())
    assert len(held) == 12 and set(base.data.exclude_labels) == held  # the base never sees the held-out colour
    assert held.isdisjoint(adapter.data.exclude_labels) and len(adapter.data.exclude_labels) == 72


def _set(config, key, value):
    """`config` with `key` set to `value`, of any type (as a config.json read back, or a replaced sub-dict, holds)."""
    d = config.to_dict()
    node = d
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


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
        # Keys and types (every leaf of base_config: test_every_leaf_refuses_a_value_of_the_wrong_type).
        (
            "train.nmu_steps",
            3,
            1,
            r"config.train.nmu_steps is not a config key .*did you mean config.train.num_steps\?",
        ),
        ("sede", 1, 1, r"config.sede is not a config key .*did you mean config.seed\?"),
        ("train", 3, 1, "config.train=3 must be a ConfigDict"),
        ("train.num_steps", "oops", 1, "config.train.num_steps='oops' must be an int"),
        ("train.num_steps", 10.5, 1, "config.train.num_steps=10.5 must be an int"),
        ("train.log_every", True, 1, "config.train.log_every=True must be an int"),
        ("model.qk_norm", "yes", 1, "config.model.qk_norm='yes' must be a bool"),
        ("diffusion.min_snr_gamma", float("nan"), 1, "config.diffusion.min_snr_gamma=nan must be a finite number"),
        ("train.learning_rate", float("inf"), 1, "config.train.learning_rate=inf must be a finite number"),
        ("data.name", 7, 1, "config.data.name=7 must be a str"),
        ("data.video_shape", (4, 8, "8", 3), 1, "config.data.video_shape=.* must be a tuple of ints"),
        ("model.windows", ((2, 2),), 1, r"config.model.windows=\(\(2, 2\),\) must be a tuple of \(t, h, w\) int"),
        ("model.out_channels", "3", 1, "config.model.out_channels='3' must be None or an int"),
        ("mesh_shape.data", "all", 1, "config.mesh_shape.data='all' must be an int"),
        ("logical_axis_rules", (("embed",),), 1, "config.logical_axis_rules=.* must be a tuple of .* pairs"),
        # Values.
        ("logical_axis_rules", (("embd", "fsdp"),), 1, "names 'embd', which is not a logical axis of the model"),
        ("mesh_shape.fsdp", -1, 8, "at most one -1 axis"),
        ("model.out_channels", 6, 1, "config.model.out_channels=6 must be None or in_channels=3"),
        ("model.remat", "some", 1, "remat 'some' is not one of"),
        ("model.dtype", "int8", 1, "dtype 'int8' is not one of"),
        ("model.pos_emb", "learned", 1, "pos_emb 'learned' is not one of"),
        ("model.attention_impl", "flash", 1, "attention_impl 'flash' is not one of"),
        ("model.sequence_parallel", "ulysses", 1, "sequence_parallel 'ulysses' is not one of"),
        ("model.label_factors", (3, 2), 1, r"label_factors \(3, 2\) must be positive with product num_classes \(4\)"),
        ("train.warmup_steps", -1, 1, "config.train.warmup_steps=-1 must be >= 0"),
        ("data.split", "", 1, "config.data.split='' must be a non-empty str"),
        ("data.feature_key", "", 1, "config.data.feature_key='' must be a non-empty str"),
        ("data.num_classes", -1, 1, r"config.data.num_classes=-1 must be >= 0 \(0 = unconditional\)"),
        ("data.label_key", "", 1, "config.data.label_key='' .* but config.data.num_classes=4"),
        ("data.video_shape", (4, 8, 8), 1, r"config.data.video_shape=\(4, 8, 8\) must be \(T, H, W, C\)"),
        ("data.text_len", 8, 1, "config.data.text_len=8 and config.model.text_dim=0 must both be > 0"),
        ("diffusion.min_snr_floor", 6.0, 1, r"min_snr_floor=6.0 must be in \[0, min_snr_gamma=5.0\]"),
        ("diffusion.num_timesteps", 1, 1, "config.diffusion.num_timesteps=1 must be >= 2"),
        ("sample.ddpm_variance", "learned", 1, "config.sample.ddpm_variance='learned' is not allowed"),
    ],
)
def test_validation_errors(key, value, devices, match):
    config = _set(helpers.tiny_config(), key, value)
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


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _refused(config, key, value) -> str:
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(_set(config, key, value), num_devices=1)
    return str(e.value)


def test_every_leaf_refuses_a_value_of_the_wrong_type():
    config = helpers.tiny_config()
    leaves = dict(_leaves(config))
    assert set(leaves) == set(dict(_leaves(config_lib.base_config())))
    for key, default in leaves.items():
        value = 7 if isinstance(default, str) else "oops"
        message = _refused(config, key, value)
        assert re.match(re.escape(f"config.{key}={value!r} must be "), message), (key, message)


# Leaves where -1 is meaningful, or that hold no count or size.
NEGATIVE_ALLOWED = {
    "mesh_shape.data": "-1 = the rest of the devices",
    "diffusion.timestep_logit_mean": "any real: the mean of the logit-normal",
    "model.windows": "read only with attention='windowed' (DiTConfig refuses a non-positive window there)",
    "logical_axis_rules": "names, not numbers",
    "latent.autoencoder_step": "-1 = the autoencoder's latest checkpoint",
    "latent.mean": "any real: the latents' per-channel mean",
    "lora.base_step": "-1 = the base's latest checkpoint (-2 is refused)",
}


def test_every_count_and_size_refuses_minus_one():
    config = helpers.tiny_config()
    for key, default in _leaves(config):
        if key in NEGATIVE_ALLOWED or isinstance(default, bool | str):
            continue
        value = (-1,) * max(len(default), 1) if isinstance(default, tuple) else -1  # ints, floats, out_channels
        message = _refused(config, key, value)
        assert key.split(".")[-1] in message, (key, message)


# Str leaves that take any name: a dataset, its feature names, a split, a directory.
ANY_STR = (
    "data.name",
    "data.builder_config",
    "data.data_dir",
    "data.split",
    "data.feature_key",
    "data.label_key",
    "latent.source",  # a dataset's name, written by the trainer from the latent dataset's metadata
    "lora.base_workdir",  # a path, read when lora.rank > 0 (tests/train_lora_test.py: a missing one is refused)
)


def test_every_named_choice_refuses_an_unknown_name():
    config = helpers.tiny_config()
    names = [key for key, default in _leaves(config) if isinstance(default, str)]
    assert set(ANY_STR) <= set(names)
    for key in names:
        if key not in ANY_STR:
            message = _refused(config, key, "oops")
            assert "'oops'" in message and key.split(".")[-1] in message, (key, message)


def test_a_missing_key_is_refused():
    config = helpers.tiny_config()
    del config.train["checkpoint_every"]
    with pytest.raises(config_lib.ConfigError, match="config.train.checkpoint_every is missing"):
        config_lib.validate(config, num_devices=1)
