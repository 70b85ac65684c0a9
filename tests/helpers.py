"""Shared test helpers: tiny configs built from the base config with overrides (never a production config)."""

import jax

from vdit_jax import config as config_lib


def tiny_config(**model_overrides):
    """A minutes-free config: a 2-block width-32 DiT on 4x8x8 videos of 4 classes, batch 8."""
    c = config_lib.base_config()
    # Random batches, no dataset: a name that claims no builder (moving_shapes has no 4x8x8 videos).
    c.data.name = "random_batches"
    c.data.video_shape = (4, 8, 8, 3)
    c.data.num_classes = 4
    c.model.update(dict(hidden_size=32, depth=2, num_heads=2, patch_size=(2, 4, 4), num_classes=4, **model_overrides))
    c.train.global_batch_size = 8
    c.train.num_steps = 20
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.sample.steps = 4
    c.diffusion.num_timesteps = 100
    return c


def random_batches(config, n, seed=0):
    """n global batches of random videos in [-1, 1] and labels."""
    b = config.train.global_batch_size
    shape = (b, *config_lib.input_shape(config))
    out = []
    for i in range(n):
        k1, k2 = jax.random.split(jax.random.key(seed * 1000 + i))
        out.append(
            {
                "video": jax.random.uniform(k1, shape, minval=-1, maxval=1),
                "label": jax.random.randint(k2, (b,), 0, config.data.num_classes),
            }
        )
    return out
