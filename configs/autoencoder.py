"""The causal 3D video autoencoder on moving_shapes (`--config=configs/autoencoder.py:VARIANT`; README, "Latent
diffusion"):

s4t4   17 frames of 32x32 (`17x32`) -> latents of 5 x 8 x 8 x 4: 4x smaller in each spatial side, 4x in time
       (17 = 1 + 4 x 4 frames: the first frame alone, then groups of 4), 41x fewer values; the VAE of the latent
       DiT (configs/latent.py)
s8t4   the same at 8x spatial (5 x 4 x 4 x 8)
s4t1   temporal x1 on `16x32` (16 frames -> 16 latent frames of 8 x 8 x 4)

The CPU recipe: 2x2 pixel patches, widths 32 / 64 / 64, (2+1)D convolutions, batch 8 of 9-frame crops, Adam at
1e-3 (warm-up 200 steps), KL weight 1e-6 (a near-deterministic bottleneck whose latents still have a bounded scale),
as many steps as a working session affords; checkpoints every 1,000 steps, so a longer run resumes where the last
one stopped.
"""

from vdit_jax import config as config_lib
from vdit_jax.tasks import autoencoder as ae_task

VARIANTS = {
    "s4t4": (
        "17x32",
        9,
        dict(spatial_compression=4, temporal_compression=4, latent_channels=4, channel_mults=(1, 2, 2)),
    ),
    "s8t4": (
        "17x32",
        9,
        dict(spatial_compression=8, temporal_compression=4, latent_channels=8, channel_mults=(1, 2, 2)),
    ),
    "s4t1": ("16x32", 8, dict(spatial_compression=4, temporal_compression=1, latent_channels=4, channel_mults=(1, 2))),
}


def get_config(arg: str = "s4t4"):
    variant = arg or "s4t4"
    if variant not in VARIANTS:
        raise ValueError(f"unknown autoencoder variant {variant!r}; allowed: {list(VARIANTS)}")
    builder, frames, model = VARIANTS[variant]
    c = config_lib.base_config(ae_task.KIND)
    c.data.builder_config = builder
    c.data.video_shape = (int(builder.split("x")[0]), 32, 32, 3)
    # Trained on random crops of 9 (8) frames: the network is convolutional and causal, so it encodes the whole
    # 17 (16) frames the same way; the crops make a step ~2x cheaper.
    c.data.num_frames = frames
    c.data.label_key = ""
    c.data.num_classes = 0
    # 2x2 pixel patches first (no convolution at full resolution: a step 2.7x cheaper on the CPU than without).
    c.model.update(base_channels=32, spatial_patch=2, num_res_blocks=1, kl_weight=1e-6, **model)
    c.train.global_batch_size = 8
    c.train.num_steps = 6000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.sample_num = 8
    return c
