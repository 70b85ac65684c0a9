"""LoRA fine-tuning on moving_shapes 8x16 (`--config=configs/lora.py:VARIANT`; README, "LoRA fine-tuning"):

base   the CPU demo's recipe (configs/moving_shapes.py:tiny) trained without the held-out colour (`HELD_OUT`): its
       12 classes (3 shapes x 4 directions) are never seen, so the colour's embedding row is never trained;
lora   rank-8 adapters on that base (pass --config.lora.base_workdir=BASE_RUN) trained on the held-out classes
       alone: attention, MLPs, adaLN modulations and the label embeddings (`models.lora.PRESETS`).

`python -m vdit_jax.evaluate --samples=... --held_out_from=BASE_RUN` splits the evaluator's metrics into the seen
and the held-out classes, before (sampling the base) and after (sampling the LoRA run).
"""

from configs import moving_shapes as ms_configs
from vdit_jax.data import moving_shapes

HELD_OUT = "white"
VARIANTS = ("base", "lora")


def held_out_labels() -> tuple[int, ...]:
    return tuple(y for y in range(moving_shapes.NUM_CLASSES) if moving_shapes.split_label(y)[0] == HELD_OUT)


def get_config(arg: str = "base"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown lora variant {arg!r}; allowed: {list(VARIANTS)}")
    c = ms_configs.get_config("tiny")
    held = held_out_labels()
    if arg == "base":
        c.data.exclude_labels = held
        return c
    c.data.exclude_labels = tuple(y for y in range(moving_shapes.NUM_CLASSES) if y not in held)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("attn", "mlp", "adaln", "label_emb")
    c.train.num_steps = 1000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 50
    c.train.checkpoint_every = 500
    return c
