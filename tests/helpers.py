"""Shared test helpers: tiny configs built from the base config with overrides (never a production config)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax import config as config_lib
from vdit_jax.data import moving_shapes as ms
from vdit_jax.tasks import interpolator


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


def randomize(params, seed=0, scale=0.05):
    """Replaces every parameter (zero-initialised gates included) with noise so outputs are non-trivial. Drawn by
    NumPy on the host: jax.random would compile a draw per leaf shape (seconds for a DiT)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), params)


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


SIZE = 8  # frame side


def tiny_interpolator_config(frames: int = 5):
    """A seconds-scale interpolator: a 1-level width-8 U-Net (attention at 8x8) on segments of `frames` 8x8
    frames, batch 4."""
    c = config_lib.base_config(interpolator.KIND)
    c.data.name = "random_batches"  # clips rendered by `clips`, no dataset
    c.data.video_shape = (frames, SIZE, SIZE, 3)
    c.data.num_classes = 0
    c.data.label_key = ""
    c.model.update(base_channels=8, channel_mults=(1,), attention_levels=(0,), num_heads=1, num_groups=2)
    c.diffusion.prediction = "x0"
    c.diffusion.min_snr_gamma = 0.0
    c.diffusion.num_timesteps = 100
    c.train.global_batch_size = 4
    c.train.learning_rate = 5e-3
    c.train.warmup_steps = 10
    c.train.end_lr_fraction = 1.0
    c.train.ema_decay = 0.0  # sample the trained weights themselves
    c.sample.steps = 10
    c.sample.guidance = 1.0
    return c


def clips(n: int, frames: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """uint8 [n, frames, size, size, 3] moving_shapes clips, rendered (a random class each, objects of size / 3 px
    as fast as the frame allows, at most 1 px/frame)."""
    rng = np.random.default_rng(seed)
    obj = size // 3
    speed = min(1.0, (size - obj - 1) / (frames - 1))
    out = []
    for _ in range(n):
        colour, shape, direction = ms.split_label(int(rng.integers(ms.NUM_CLASSES)))
        out.append(ms.render(rng, frames, size, colour, shape, direction, object_size=obj, speed=speed)["video"])
    return np.stack(out)


def tiny_text_keyframe_config():
    """`tiny_keyframe_config` conditioned on free text through the built-in encoder (the moving_shapes words)."""
    c = tiny_keyframe_config()
    c.data.num_classes = c.model.num_classes = 0
    c.data.text_len = 8
    c.model.update(text_dim=16, text_vocab=ms.VOCABULARY, text_encoder_depth=1)
    return c


def tiny_keyframe_config():
    """The keyframe stage of a tiny pipeline: `tiny_config`'s DiT on frames 0, 4, 8 of 9-frame 8x8 videos (frame
    stride 4: gaps of 3, which `tiny_interpolator_config`'s segments of 5 fill), 3 x 2 x 2 tokens, batch 2."""
    c = tiny_config()
    c.model.patch_size = (1, 4, 4)
    c.data.video_shape = (9, SIZE, SIZE, 3)
    c.data.num_frames = 3
    c.data.frame_stride = 4
    c.train.global_batch_size = 2
    return c


def stand_in_encoder(captions, dim=12):
    """A deterministic stand-in for a frozen text encoder (`vdit_jax.data.text_embeddings`): one seeded vector per
    word (seeded by the word's CRC), masked padding. Importable without the CLIs' flags:
    `--encoder=tests.helpers:stand_in_encoder`."""
    words = [c.split() for c in captions]
    emb = np.zeros((len(captions), max(map(len, words)), dim), np.float32)
    mask = np.zeros(emb.shape[:2], bool)
    for i, ws in enumerate(words):
        for j, w in enumerate(ws):
            emb[i, j] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim)
            mask[i, j] = True
    return emb, mask
