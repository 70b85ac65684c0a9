"""Latent diffusion on moving_shapes 17x32 (`--config=configs/latent.py:VARIANT`; README, "Latent diffusion"):

latent  the CPU demo's DiT recipe on `video_latents/ms17_s4t4`: the 17x32x32 videos encoded once by the
        autoencoder of configs/autoencoder.py:s4t4 into latents of 5 x 8 x 8 x 4 (`python -m vdit_jax.data.latents`);
        1x2x2 patches: 80 tokens of 16 values. Sampling decodes to 17 frames of 32x32.
pixel   the same DiT on the 17x32 pixels themselves, per-frame 1x4x4 patches (1,088 tokens of 48 values): the
        cost per step latent diffusion saves (README: steps/s of both).
"""

from configs import moving_shapes as ms_configs
from vdit_jax.data import latents

VARIANTS = ("latent", "pixel")
LATENT_DATASET = f"{latents.NAME}/ms17_s4t4"


def get_config(arg: str = "latent"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown latent variant {arg!r}; allowed: {list(VARIANTS)}")
    c = ms_configs.get_config("tiny")
    if arg == "latent":
        c.data.name = LATENT_DATASET
        c.data.builder_config = ""
        c.data.video_shape = (5, 8, 8, 4)
        c.model.in_channels = 4
        c.model.patch_size = (1, 2, 2)
        # Normalised latents are not confined to [-1, 1]: the object's latents lie several std from the black
        # background's, and clipping x0 to [-1, 1] drew faint smudges (evaluator colour 0.42, shape 0.30).
        c.sample.clip_x0 = 0.0
    else:
        c.data.builder_config = "17x32"
        c.data.video_shape = (17, 32, 32, 3)
        c.model.patch_size = (1, 4, 4)
    return c
