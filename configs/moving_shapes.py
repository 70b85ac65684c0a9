"""moving_shapes experiments: `--config=configs/moving_shapes.py:VARIANT` with VARIANT one of tiny / S / B / XL.

`tiny` is the CPU demo (README): a small DiT on the 8x32 builder config, 1,600 steps in about ten minutes on two
cores; what its samples reach is measured in the README. S / B / XL are the same task at accelerator scale on
the 16x64 builder config.
"""

from vdit_jax import config as config_lib
from vdit_jax.data import moving_shapes
from vdit_jax.models import dit

VARIANTS = ("tiny", "S", "B", "XL")


def get_config(arg: str = "tiny"):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown moving_shapes variant {variant!r}; allowed: {list(VARIANTS)}")
    c = config_lib.base_config()
    c.model.update(dit.SIZES[variant])
    c.model.num_classes = c.data.num_classes
    # One embedding per attribute (colour x shape x direction, the label's mixed-radix digits) instead of one per
    # class: each is learned from every class that has it (tiny demo: direction accuracy 0.23 -> 0.63).
    c.model.label_factors = (len(moving_shapes.COLOUR_NAMES), len(moving_shapes.SHAPES), len(moving_shapes.DIRECTIONS))
    if variant == "tiny":
        # The CPU demo recipe, measured on 2 cores (README): 8-frame clips (2 x 8 x 8 = 128 tokens of 4x4x4 tubelets),
        # x0-prediction (a width-128 model cannot pass a 192-value noise patch through, so eps / v predictions
        # leave residual noise), plain x0 MSE (min-SNR starves the high-noise steps where the label is learned),
        # small batches and many steps, strong guidance (6 beat 3 and 10 at DDIM 50).
        c.data.builder_config = "8x32"
        c.data.video_shape = (8, 32, 32, 3)
        c.model.patch_size = (4, 4, 4)
        c.diffusion.prediction = "x0"
        c.diffusion.min_snr_gamma = 0.0
        c.train.global_batch_size = 16
        c.train.num_steps = 1600
        c.train.learning_rate = 2e-3
        c.train.warmup_steps = 100
        c.train.log_every = 100
        c.train.checkpoint_every = 400
        c.sample.guidance = 6.0
    else:
        c.data.builder_config = "16x64"
        c.data.video_shape = (16, 64, 64, 3)
        c.model.patch_size = (1, 4, 4)
        c.model.scan_layers = True
        c.model.remat = "dots_no_batch"
        c.model.dtype = "bfloat16"
        c.train.global_batch_size = 64
        c.train.num_steps = 50_000
        c.train.learning_rate = 3e-4
        c.train.warmup_steps = 1000
        c.train.log_every = 100
        c.train.checkpoint_every = 2000
        c.train.sample_every = 5000
    return c
