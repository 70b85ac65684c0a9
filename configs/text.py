"""Text-to-video on moving_shapes/8x16: `--config=configs/text.py:VARIANT` with VARIANT `cross` or `joint`.

The CPU demo's DiT recipe (configs/moving_shapes.py:tiny), with tokens of 2 frames x 4x4 pixels, conditioned on the
captions through the built-in text encoder (`vdit_jax.models.text`: the caption words as the vocabulary, a 2-block
transformer of width 64, trained with the DiT) instead of class labels:

cross  a cross-attention sublayer in every block (PixArt / Open-Sora / Wan)
joint  MM-DiT joint attention (SD3 / Flux / HunyuanVideo): dual-stream blocks, the last one single-stream

Compositional generalisation: `HELD_OUT` (12 colour x shape x direction combinations, every colour, shape and
direction still seen in others) is left out of training (`data.exclude_labels`); `python -m vdit_jax.evaluate
--samples=... --held_out_from=RUN` reports the held-out prompts apart from the seen ones. The number of steps is
set so that each variant trains for the class demo's wall-clock budget on 2 CPU cores (README), not its steps.
"""

from configs import moving_shapes as moving_shapes_configs
from vdit_jax.data import moving_shapes as ms

VARIANTS = ("cross", "joint")

# Colour i with shape i mod 3 and direction i mod 4 (7), and with shape i + 1 and direction i + 2 (5 more).
HELD_OUT_COMBINATIONS = tuple((ms.COLOUR_NAMES[i], ms.SHAPES[i % 3], ms.DIRECTIONS[i % 4]) for i in range(7)) + tuple(
    (ms.COLOUR_NAMES[i], ms.SHAPES[(i + 1) % 3], ms.DIRECTIONS[(i + 2) % 4]) for i in range(5)
)
HELD_OUT = tuple(sorted(ms.label_for(*combo) for combo in HELD_OUT_COMBINATIONS))

# Steps for the class demo's training time (its 4,600 steps) on 2 cores, timed with the training loop itself
# (`vdit_jax.train ... --config.train.sample_num=0`, metrics.jsonl every 200 steps, a nearly idle CPU, 2026-11-30):
# the first 200 steps (start-up and compile) took 54.6 s for the class demo, 69 s for `cross`, 71.4 s for `joint`,
# then 191.5, 227 and 214.5 ms a step; the demo's 4,600 steps are ~899 s (from its first 1,600), which buy 3,850
# `cross` and 4,050 `joint` steps. (Timing the train step alone gave 1.14 times the demo's for both; a 700-step
# loop with the demo's tokens gave 3,600 for `cross`.)
STEPS = {"cross": 3850, "joint": 4000}


def get_config(arg: str = "cross"):
    variant = arg or "cross"
    if variant not in VARIANTS:
        raise ValueError(f"unknown text variant {variant!r}; allowed: {list(VARIANTS)}")
    c = moving_shapes_configs.get_config("tiny")
    c.data.num_classes = 0
    c.data.text_len = 1 + ms.CAPTION_WORDS + 2  # <bos>, the five caption words, two tokens of padding
    c.data.exclude_labels = HELD_OUT
    c.model.num_classes = 0
    c.model.label_factors = ()
    c.model.text_vocab = ms.VOCABULARY
    c.model.text_dim = 64
    c.model.text_encoder_depth = 2
    c.model.text_encoder_heads = 2
    c.model.text_max_len = 16
    # A pooled caption in the adaLN conditioning too (SD3 / Flux; for the built-in encoder a bag of words,
    # `text.BagOfWords`): without it, cross-attention alone learned the colour but not the direction in the demo's
    # budget (direction 0.25 = chance, shape 0.41; README).
    c.model.text_pooled = True
    # Tokens of 2 frames x 4x4 pixels instead of the class demo's 8 frames x 2x2: the same 64 tokens of 96 values (the
    # same cost a step), but a token no longer smears the moving object over all 8 frames, so its outline survives
    # (shape on the seen prompts 0.60 -> 0.80 for `joint` at 4,000 steps; the keyframe DiT's finding, README).
    c.model.patch_size = (2, 4, 4)
    if variant == "joint":
        c.model.text_mode = "joint"
        c.model.single_stream_blocks = 1
    c.train.num_steps = STEPS[variant]
    return c
