"""Multi-stage video on moving_shapes/16x16: `--config=configs/multistage.py:VARIANT`.

keyframes     A class-conditional DiT on every 5th frame of the 16-frame clips (frames 0, 5, 10, 15): the
              keyframe stage. The demo's recipe (README) with 4x4 patches of one frame each -> 64 tokens (the
              demo's tubelets spanning every frame, 2x2 over the 4 keyframes, mix four views of an object that
              moved 5 frames' distance between them: shape accuracy 0.43 against 0.93 with one frame a token,
              at the same 4,600 steps and cost; README).
interpolator  The U-Net frame interpolator (`vdit_jax.models.unet`) on segments of 6 frames (random crops): fills
              gaps of 1..4 frames, so the 4 frames between two keyframes 5 apart. Spatial attention at every
              level (16x16 too: with the bracket keyframe channels a pixel of a frame between looks up where the
              object is in both keyframes).
single        The single-stage baseline: the same DiT recipe on all 16 frames (2x2 patches spanning 8 frames ->
              128 tokens).

`python -m vdit_jax.sample --pipeline=keyframes+interpolate --workdir=KEYFRAME_RUN --interpolator=INTERP_RUN`
chains the first two (`vdit_jax.pipeline`).
"""

from configs import moving_shapes as moving_shapes_configs
from vdit_jax import config as config_lib
from vdit_jax.data import moving_shapes
from vdit_jax.tasks import interpolator

VARIANTS = ("keyframes", "interpolator", "single")
KEYFRAME_STRIDE = 5  # 16 frames -> keyframes 0, 5, 10, 15; gaps of 4


def _data(c, num_frames: int, frame_stride: int):
    c.data.builder_config = "16x16"
    c.data.video_shape = moving_shapes.video_shape("16x16")
    c.data.num_frames = num_frames
    c.data.frame_stride = frame_stride


def get_config(arg: str = "keyframes"):
    variant = arg or "keyframes"
    if variant not in VARIANTS:
        raise ValueError(f"unknown multistage variant {variant!r}; allowed: {list(VARIANTS)}")
    if variant == "interpolator":
        c = config_lib.base_config(interpolator.KIND)
        _data(c, KEYFRAME_STRIDE + 1, 1)
        c.data.label_key = ""  # the keyframes are the condition
        c.data.num_classes = 0
        # Sized for 2 CPU cores: XLA's CPU batched matmuls are slow at small head widths (the temporal attention
        # over 6 frames at 4 heads of 4 cost 4x one head of 16), so one head.
        c.model.update(base_channels=16, channel_mults=(1, 2, 2), attention_levels=(0, 1, 2), num_heads=1, num_groups=4)
        c.diffusion.prediction = "x0"
        c.diffusion.min_snr_gamma = 0.0
        c.train.global_batch_size = 8
        # The README's run: 6,000 steps, then resumed to 10,000 (the schedule stretched at 6,000); PSNR still rose
        # (+1.6 dB at g = 3 sampled with DDIM-25).
        c.train.num_steps = 10000
        c.train.learning_rate = 1e-3
        c.train.warmup_steps = 100
        c.train.log_every = 100
        c.train.checkpoint_every = 500
        c.sample.steps = 25
        c.sample.guidance = 1.0
        return c
    c = moving_shapes_configs.get_config("tiny")  # the demo's DiT recipe (configs/moving_shapes.py), here on 16x16
    if variant == "keyframes":
        _data(c, 16 // KEYFRAME_STRIDE + 1, KEYFRAME_STRIDE)
        c.model.patch_size = (1, 4, 4)
    else:  # single
        _data(c, 16, 1)
        c.model.patch_size = (8, 2, 2)
    return c
