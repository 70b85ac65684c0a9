"""`moving_shapes`: a procedurally generated TFDS dataset of one filled shape moving across a black frame.

The contract (DESIGN.md §4): video `(T, S, S, 3)` uint8, black background, one crisp filled shape in an exact palette
colour, moving in a straight line at constant speed, fully inside the frame for all T frames.
`label = (colour_index * 3 + shape_index) * 4 + direction_index` (84 classes), caption
`f"a {colour} {shape} moving {direction}"`.

Everything is pure NumPy and deterministic: example `i` of split `s` is rendered from
`np.random.default_rng([seed, crc32(s), i])`, so it does not depend on generation order. The builder writes
array_record files and is read with `tfds.data_source` — no TensorFlow anywhere (hence a ZLIB `Tensor` for the video
instead of `tfds.features.Video`).

    builder = moving_shapes.prepare("/tmp/data", "8x32")       # builds once, later a no-op
    source = moving_shapes.data_source("/tmp/data", "8x32", "train")
    source[0]["video"].shape                                    # (8, 32, 32, 3)
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# ---------------------------------------------------------------- the vocabulary (orders are part of the contract)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array(list(COLOURS.values()), np.uint8)  # [7, 3], in COLOUR_NAMES order
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
NUM_CLASSES = len(COLOURS) * len(SHAPES) * len(DIRECTIONS)  # 84

# Unit velocity of each direction in image coordinates (x right, y down).
VELOCITY: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

REFERENCE_SIZE = 32  # the ranges below are for S=32 and scale linearly with S
SPEED_RANGE = (0.75, 1.25)  # px/frame, uniform
OBJECT_SIZE_RANGE = (7, 11)  # px across (bounding box side), integer, inclusive

# The words of every caption, in this order: the vocabulary of the built-in text encoder (`vdit_jax.models.text`).
VOCABULARY: tuple[str, ...] = ("a", *COLOUR_NAMES, *SHAPES, "moving", *DIRECTIONS)
CAPTION_WORDS = 5  # "a {colour} {shape} moving {direction}"

GRAMMAR = (
    f'"a {{colour}} {{shape}} moving {{direction}}" with colour in {{{", ".join(COLOUR_NAMES)}}}, '
    f"shape in {{{', '.join(SHAPES)}}}, direction in {{{', '.join(DIRECTIONS)}}}"
)


# ---------------------------------------------------------------- labels and captions


def label_for(colour: str, shape: str, direction: str) -> int:
    """The class label of a (colour, shape, direction) triple of names."""
    return (_index(colour, COLOUR_NAMES, "colour") * len(SHAPES) + _index(shape, SHAPES, "shape")) * len(
        DIRECTIONS
    ) + _index(direction, DIRECTIONS, "direction")


def split_label(label: int) -> tuple[str, str, str]:
    """(colour, shape, direction) names of a class label."""
    label = int(label)
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} is out of range; allowed: 0..{NUM_CLASSES - 1}")
    rest, direction = divmod(label, len(DIRECTIONS))
    colour, shape = divmod(rest, len(SHAPES))
    return COLOUR_NAMES[colour], SHAPES[shape], DIRECTIONS[direction]


def caption_for(label: int) -> str:
    """The caption of a class label, e.g. 0 -> "a red square moving left"."""
    colour, shape, direction = split_label(label)
    return f"a {colour} {shape} moving {direction}"


_CAPTION_RE = re.compile(r"a (\w+) (\w+) moving (\w+)")


def parse_caption(text: str) -> int:
    """The class label of a caption; ValueError naming the prompt and the grammar if it does not parse.

    Whitespace, case and punctuation are normalised ("A Red  square, moving LEFT." is fine: its words are runs of
    letters and digits, as the built-in tokenizer reads them); the words must be from the vocabulary.
    """
    normalised = " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))
    match = _CAPTION_RE.fullmatch(normalised)
    if match is None or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in DIRECTIONS:
        raise ValueError(f"prompt {text!r} is not a moving_shapes caption; expected {GRAMMAR}")
    return label_for(match[1], match[2], match[3])


def _index(value: str | int, names: tuple[str, ...], what: str) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"{what} {value!r} is not allowed; use one of {list(names)}")
        return names.index(value)
    value = int(value)
    if not 0 <= value < len(names):
        raise ValueError(f"{what} index {value} is out of range; allowed: 0..{len(names) - 1} ({list(names)})")
    return value


# ---------------------------------------------------------------- rendering


def render(
    rng_or_seed: np.random.Generator | int | None,
    num_frames: int,
    size: int,
    colour: str | int,
    shape: str | int,
    direction: str | int,
    *,
    object_size: int | None = None,
    speed: float | None = None,
    start: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Renders one clip; the free parameters not given are drawn from `rng_or_seed`.

    Args:
      rng_or_seed: a numpy Generator or an int seed (used for whatever is not given explicitly).
      num_frames: T.
      size: S, the frame side in pixels.
      colour, shape, direction: names (or indices) from COLOUR_NAMES, SHAPES, DIRECTIONS.
      object_size: bounding-box side in pixels; default uniform integer in OBJECT_SIZE_RANGE * S/32.
      speed: px/frame; default uniform in SPEED_RANGE * S/32.
      start: (x, y) centre of the bounding box at frame 0 (continuous pixel coordinates, y down); default uniform
        over the positions that keep the whole shape inside the frame for all frames.

    Returns:
      {"video": uint8 [T, S, S, 3], "size": int32 [], "speed": float32 [], "start": float32 [2] (x, y)}.
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    c = _index(colour, COLOUR_NAMES, "colour")
    s = SHAPES[_index(shape, SHAPES, "shape")]
    vx, vy = VELOCITY[DIRECTIONS[_index(direction, DIRECTIONS, "direction")]]
    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames={num_frames} and size={size} must be >= 1")
    scale = size / REFERENCE_SIZE
    if object_size is None:
        lo, hi = (round(v * scale) for v in OBJECT_SIZE_RANGE)
        object_size = int(rng.integers(lo, hi, endpoint=True))
    if speed is None:
        speed = float(rng.uniform(*SPEED_RANGE)) * scale
    half = object_size / 2
    travel = speed * (num_frames - 1)
    if size - object_size - travel < 0:
        raise ValueError(
            f"a {object_size}px shape moving {speed:.2f} px/frame for {num_frames} frames does not fit in {size}px"
        )
    if start is None:
        start = tuple(_draw_start(rng, v, half, travel, size) for v in (vx, vy))
    x0, y0 = start

    t = np.arange(num_frames, dtype=np.float64)
    x = x0 + vx * speed * t  # [T] centre positions
    y = y0 + vy * speed * t
    centres = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    dx = centres[None, None, :] - x[:, None, None]  # [T, 1, S]
    dy = centres[None, :, None] - y[:, None, None]  # [T, S, 1]
    # Half-open intervals so an integer-sized shape covers exactly object_size pixels across; no anti-aliasing.
    if s == "square":
        mask = (dx >= -half) & (dx < half) & (dy >= -half) & (dy < half)
    elif s == "circle":
        mask = dx**2 + dy**2 < half**2
    else:  # isosceles triangle, apex up: its half-width grows from 0 at the top to `half` at the base
        w = (dy + half) / 2
        mask = (dy >= -half) & (dy < half) & (dx >= -w) & (dx < w)
    video = np.where(mask[..., None], PALETTE[c], np.uint8(0)).astype(np.uint8)  # [T, S, S, 3]
    return {
        "video": video,
        "size": np.int32(object_size),
        "speed": np.float32(speed),
        "start": np.array(start, np.float32),
    }


def _draw_start(rng: np.random.Generator, v: int, half: float, travel: float, size: int) -> float:
    """A start coordinate keeping [p - half, p + half] inside [0, size] along the whole path."""
    lo, hi = half, size - half
    if v > 0:
        hi -= travel
    elif v < 0:
        lo += travel
    return float(rng.uniform(lo, hi))


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one example: a function of (seed, split, index) only, so generation order does not matter."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_example(seed: int, split: str, index: int, num_frames: int, size: int) -> dict:
    """One example exactly as stored: a uniformly drawn class rendered with the example's own RNG."""
    rng = example_rng(seed, split, index)
    label = int(rng.integers(NUM_CLASSES))
    colour, shape, direction = split_label(label)
    clip = render(rng, num_frames, size, colour, shape, direction)
    return {
        **clip,
        "label": label,
        "caption": caption_for(label),
        "colour": colour,
        "shape": shape,
        "direction": direction,
    }


# ---------------------------------------------------------------- the TFDS builder


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(tfds.core.BuilderConfig):
    num_frames: int = 16  # T
    size: int = 32  # S
    seed: int = 0
    num_train: int = 10_000
    num_test: int = 1_000


class MovingShapes(tfds.core.GeneratorBasedBuilder):
    """One filled shape (square / circle / triangle, 7 colours) moving left/right/up/down on black; 84 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        MovingShapesConfig(name="16x32", num_frames=16, size=32, description="16 frames of 32x32 (the default)."),
        MovingShapesConfig(name="16x64", num_frames=16, size=64, description="16 frames of 64x64."),
        MovingShapesConfig(name="8x32", num_frames=8, size=32, description="8 frames of 32x32 (cheap CPU tests)."),
        MovingShapesConfig(name="8x16", num_frames=8, size=16, description="8 frames of 16x16 (the CPU demo)."),
        MovingShapesConfig(
            name="16x16", num_frames=16, size=16, description="16 frames of 16x16 (the CPU multi-stage demo)."
        ),
        # 1 + 4k frames: what a causal video autoencoder with temporal compression 4 encodes (17 -> 5 latent frames).
        MovingShapesConfig(name="17x32", num_frames=17, size=32, description="17 frames of 32x32 (latent demo)."),
        MovingShapesConfig(name="17x64", num_frames=17, size=64, description="17 frames of 64x64."),
    ]
    DEFAULT_CONFIG_NAME = "16x32"
    # TFDS 4.9.10 derives this via `importlib_resources`, which is only installed on Python < 3.9; give it directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        t, s = self.builder_config.num_frames, self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(
                        shape=(t, s, s, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "label": tfds.features.ClassLabel(names=[caption_for(i) for i in range(NUM_CLASSES)]),
                    "caption": tfds.features.Text(),
                    "colour": tfds.features.ClassLabel(names=COLOUR_NAMES),
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "direction": tfds.features.ClassLabel(names=DIRECTIONS),
                    "size": tfds.features.Scalar(dtype=np.int32),  # bounding-box side, px
                    "speed": tfds.features.Scalar(dtype=np.float32),  # px/frame
                    "start": tfds.features.Tensor(shape=(2,), dtype=np.float32),  # (x, y) centre at frame 0
                }
            ),
            supervised_keys=("video", "label"),
            disable_shuffling=True,  # record i is example i: reproducible and checkable against make_example
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test),
        }

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        for i in range(num):
            yield i, make_example(c.seed, split, i, c.num_frames, c.size)


NAME = MovingShapes.name  # "moving_shapes", the TFDS name (config.data.name)
CONFIG_NAMES: tuple[str, ...] = tuple(c.name for c in MovingShapes.BUILDER_CONFIGS)


def video_shape(config: str) -> tuple[int, int, int, int]:
    """(T, S, S, 3) of the videos of builder config `config` (e.g. "8x16" -> (8, 16, 16, 3))."""
    _check_config(config)
    c = next(c for c in MovingShapes.BUILDER_CONFIGS if c.name == config)
    return (c.num_frames, c.size, c.size, 3)


def _check_config(config: str) -> None:
    if config not in CONFIG_NAMES:
        raise ValueError(f"moving_shapes config {config!r} is not allowed; use one of {list(CONFIG_NAMES)}")


def prepare(data_dir: str, config: str = MovingShapes.DEFAULT_CONFIG_NAME) -> MovingShapes:
    """The builder for `config` under `data_dir`, generating its array_record files first if they are missing."""
    _check_config(config)
    builder = MovingShapes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")  # no-op when already prepared
    return builder


def data_source(data_dir: str, config: str = MovingShapes.DEFAULT_CONFIG_NAME, split: str = "train"):
    """A random-access `tfds.data_source` of a prepared split (call `prepare` first): `len()` and `[i]` -> dict."""
    _check_config(config)
    data_dir = os.fspath(data_dir)
    if not MovingShapes(config=config, data_dir=data_dir, file_format="array_record").is_prepared():
        raise FileNotFoundError(
            f"moving_shapes/{config} is not prepared under data dir {data_dir!r}; call moving_shapes.prepare first"
        )
    return tfds.data_source(f"moving_shapes/{config}", split=split, data_dir=data_dir, download=False)
