"""A seconds-scale experiment config for the trainer/CLI tests: a 2-block width-32 DiT on moving_shapes 8x32."""

from vdit_jax import config as config_lib


def get_config(arg: str = ""):
    c = config_lib.base_config()
    c.data.builder_config = "8x32"
    c.data.video_shape = (8, 32, 32, 3)
    c.model.update(dict(hidden_size=32, depth=2, num_heads=2, patch_size=(2, 8, 8), num_classes=84))
    c.train.global_batch_size = 8
    c.train.num_steps = 8
    c.train.warmup_steps = 2
    c.train.end_lr_fraction = 1.0  # flat after warm-up: a run's losses do not depend on its length (num_steps)
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_num = 2
    c.sample.steps = 3
    c.diffusion.num_timesteps = 50
    return c
