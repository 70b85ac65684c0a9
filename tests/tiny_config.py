"""Seconds-scale experiment configs for the trainer/CLI tests on moving_shapes 8x32.

""            a 2-block width-32 DiT on the whole clips
"keyframes"     the same DiT on frames 0, 3, 6 (frame stride 3), batch 2: the keyframe stage of a tiny pipeline
"interpolator"  a 2-level width-8 U-Net interpolator on segments of 4 frames (gaps of 1 and 2), batch 2
"""

from vdit_jax import config as config_lib
from vdit_jax.tasks import interpolator


def get_config(arg: str = ""):
    if arg not in ("", "keyframes", "interpolator"):
        raise ValueError(f"unknown tiny variant {arg!r}")
    c = config_lib.base_config(interpolator.KIND if arg == "interpolator" else "dit")
    c.data.builder_config = "8x32"
    c.data.video_shape = (8, 32, 32, 3)
    if arg == "interpolator":
        c.data.num_frames = 4
        c.data.label_key = ""
        c.data.num_classes = 0
        c.model.update(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), num_heads=1, num_groups=2)
        c.sample.guidance = 1.0
    else:
        c.model.update(dict(hidden_size=32, depth=2, num_heads=2, patch_size=(2, 8, 8), num_classes=84))
    if arg == "keyframes":
        c.data.num_frames = 3
        c.data.frame_stride = 3
        c.model.patch_size = (1, 8, 8)
    c.train.global_batch_size = 2 if arg else 8  # the pipeline's stages: only their plumbing is tested
    c.train.num_steps = 8
    c.train.warmup_steps = 2
    c.train.end_lr_fraction = 1.0  # flat after warm-up: a run's losses do not depend on its length (num_steps)
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_num = 2
    c.sample.steps = 3
    c.diffusion.num_timesteps = 50
    return c
