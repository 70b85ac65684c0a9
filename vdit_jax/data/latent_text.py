"""`synthetic_latent_text`: a small TFDS dataset shaped like a latent text-to-video dataset, built on first use.

What a latent text-to-video run reads, made learnable and cheap (DESIGN.md §4 "Batch and dataset fields"):

    video      float32 [T', H', W', C']  a moving_shapes clip rendered at the latent resolution, its RGB mapped to
                                         C' channels by a fixed projection and normalised to about zero mean and
                                         unit variance per channel (`to_rgb` maps it back to pixels)
    text       float32 [L, D]            precomputed "text-encoder" embeddings: one fixed seeded vector of width D
                                         per caption word, zeros on the padding
    text_mask  bool [L]                  True on the caption's words, False on the padding
    caption    text                      "a [small|big] {colour} {shape} moving {direction}[ slowly| quickly]": the
                                         bracketed words describe the clip's true size and speed, each present with
                                         probability 1/2, so real lengths vary (5-7 words)
    label      int (84 classes)          the moving_shapes class of (colour, shape, direction)

Two examples with the same caption have the same text, and the video follows the caption: a model can learn it.
The shapes come from a run's config (`data.video_shape`, `data.text_len`, `model.text_dim`); each combination is a
builder config named by them, e.g. `16x32x32x4-text120x4096`. The per-channel mean and std of the stored training
latents are in the dataset's metadata (`latent_mean`, `latent_std`). Everything is deterministic from the seed:
example i of split s depends on (seed, s, i) only. Written as array_record, read with a data source, no TensorFlow.

    config = latent_text.builder_config((4, 8, 8, 4), text_len=8, text_dim=16, num_train=64, num_test=16)
    latent_text.prepare("/tmp/data", config)                   # builds once, later a no-op
    source = latent_text.data_source("/tmp/data", config, "train")
    source[0]["text"].shape                                    # (8, 16)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vdit_jax.data import moving_shapes as ms

NAME = "synthetic_latent_text"
SIZE_WORDS = ("small", "big")  # object size below / above the middle of its range
SPEED_WORDS = ("slowly", "quickly")  # speed below / above the middle of its range
VOCABULARY: tuple[str, ...] = (
    "a",
    *ms.COLOUR_NAMES,
    *ms.SHAPES,
    "moving",
    *ms.DIRECTIONS,
    *SIZE_WORDS,
    *SPEED_WORDS,
)
MAX_WORDS = 7  # "a big red square moving left quickly"
NUM_CALIBRATION = 64  # clips that fix the latent normalisation (a stream of their own)

_PROJECTION_STREAM = 0x9A7E  # seeds of the fixed RGB -> latent projection, the word table and the calibration clips
_WORD_STREAM = 0x7E47
_CALIBRATION_SPLIT = "calibration"


@dataclasses.dataclass(eq=False)
class LatentTextConfig(tfds.core.BuilderConfig):
    video_shape: tuple[int, int, int, int] = (16, 32, 32, 4)  # (T', H', W', C')
    text_len: int = 120  # L
    text_dim: int = 4096  # D
    seed: int = 0
    num_train: int = 400
    num_test: int = 40


def config_name(video_shape: Sequence[int], text_len: int, text_dim: int, seed: int = 0, num_train=400, num_test=40):
    """The builder config name of these shapes, e.g. `16x32x32x4-text120x4096` (seed and sizes only if not the
    defaults)."""
    name = "x".join(str(int(d)) for d in video_shape) + f"-text{int(text_len)}x{int(text_dim)}"
    if seed:
        name += f"-seed{int(seed)}"
    if (num_train, num_test) != (400, 40):
        name += f"-n{int(num_train)}+{int(num_test)}"
    return name


def builder_config(
    video_shape: Sequence[int], text_len: int, text_dim: int, *, seed: int = 0, num_train: int = 400, num_test: int = 40
) -> LatentTextConfig:
    """The builder config for latents of `video_shape` (T', H', W', C') and text [text_len, text_dim]."""
    shape = tuple(int(d) for d in video_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{NAME}: video_shape={tuple(video_shape)} must be four positive ints (T', H', W', C')")
    if min(shape[1:3]) < 8:
        raise ValueError(f"{NAME}: video_shape={shape} needs H' and W' >= 8 to draw a shape")
    if text_len < 1 or text_dim < 1:
        raise ValueError(
            f"{NAME}: text_len={text_len} and text_dim={text_dim} must be >= 1 (config.data.text_len and "
            "config.model.text_dim: this dataset is for text-conditioned models)"
        )
    if seed < 0 or num_train < 1 or num_test < 1:
        raise ValueError(f"{NAME}: seed={seed} must be >= 0, num_train={num_train} and num_test={num_test} >= 1")
    return LatentTextConfig(
        name=config_name(shape, text_len, text_dim, seed, num_train, num_test),
        description=f"latents {shape}, text [{text_len}, {text_dim}], seed {seed}",
        video_shape=shape,
        text_len=int(text_len),
        text_dim=int(text_dim),
        seed=int(seed),
        num_train=int(num_train),
        num_test=int(num_test),
    )


# ---------------------------------------------------------------- text


def caption_words(rng: np.random.Generator, clip: dict, colour: str, shape: str, direction: str, size: int) -> list:
    """The caption's words: the class words plus, each with probability 1/2, the true size and speed words."""
    scale = size / ms.REFERENCE_SIZE
    lo, hi = (round(v * scale) for v in ms.OBJECT_SIZE_RANGE)
    big = float(clip["size"]) > (lo + hi) / 2
    quick = float(clip["speed"]) > scale * sum(ms.SPEED_RANGE) / 2
    with_size, with_speed = rng.random(2) < 0.5
    words = ["a", *([SIZE_WORDS[big]] if with_size else []), colour, shape, "moving", direction]
    return words + ([SPEED_WORDS[quick]] if with_speed else [])


@functools.cache
def _word_vectors(seed: int, text_dim: int) -> dict[str, np.ndarray]:
    """One fixed N(0, 1) vector of width D per vocabulary word."""
    out = {}
    for word in VOCABULARY:
        rng = np.random.default_rng([seed, _WORD_STREAM, zlib.crc32(word.encode())])
        out[word] = rng.standard_normal(text_dim).astype(np.float32)
    return out


def embed_text(words: Sequence[str], text_len: int, text_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(text float32 [L, D], text_mask bool [L]) of a caption's words: one fixed vector per word, the first L words
    kept, zeros and False on the padding."""
    table = _word_vectors(seed, text_dim)
    words = list(words)[:text_len]
    unknown = [w for w in words if w not in table]
    if unknown:
        raise ValueError(f"{NAME}: words {unknown} are not in the vocabulary {list(VOCABULARY)}")
    text = np.zeros((text_len, text_dim), np.float32)
    if words:
        text[: len(words)] = np.stack([table[w] for w in words])
    return text, np.arange(text_len) < len(words)


# ---------------------------------------------------------------- latents


def _render_size(video_shape: Sequence[int]) -> int:
    return max(video_shape[1], video_shape[2])


def _render_clip(rng: np.random.Generator, video_shape: Sequence[int]) -> tuple[int, dict]:
    """(label, moving_shapes clip) rendered at the latent resolution: square frames of side max(H', W'), the speed
    capped so that the shape stays inside the frame for all T' frames."""
    t, size = video_shape[0], _render_size(video_shape)
    label = int(rng.integers(ms.NUM_CLASSES))
    scale = size / ms.REFERENCE_SIZE
    lo, hi = (round(v * scale) for v in ms.OBJECT_SIZE_RANGE)
    object_size = int(rng.integers(lo, hi, endpoint=True))
    speed = float(rng.uniform(*ms.SPEED_RANGE)) * scale
    speed = min(speed, (size - object_size) / max(t - 1, 1))
    clip = ms.render(rng, t, size, *ms.split_label(label), object_size=object_size, speed=speed)
    return label, clip


def _resample(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of [T, S, S, 3] frames to [T, H, W, 3] (identity when S = H = W)."""
    size = rgb.shape[1]
    rows = (np.arange(height) * size) // height
    cols = (np.arange(width) * size) // width
    return rgb[:, rows][:, :, cols]


@functools.cache
def _projection(seed: int, channels: int) -> np.ndarray:
    """The fixed RGB -> latent projection [3, C'] (rank min(3, C'))."""
    rng = np.random.default_rng([seed, _PROJECTION_STREAM])
    return (rng.standard_normal((3, channels)) / np.sqrt(3)).astype(np.float32)


def _project(video: np.ndarray, video_shape: Sequence[int], seed: int) -> np.ndarray:
    """uint8 [T, S, S, 3] -> unnormalised latents float32 [T', H', W', C']."""
    rgb = _resample(video, video_shape[1], video_shape[2]).astype(np.float32) / 127.5 - 1.0
    return rgb @ _projection(seed, video_shape[3])


@functools.cache
def _normalisation(video_shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (shift, scale) [C'] of the projected latents over NUM_CALIBRATION clips of their own stream."""
    latents = np.stack(
        [
            _project(
                _render_clip(ms.example_rng(seed, _CALIBRATION_SPLIT, i), video_shape)[1]["video"], video_shape, seed
            )
            for i in range(NUM_CALIBRATION)
        ]
    )
    axes = tuple(range(latents.ndim - 1))
    return latents.mean(axes), np.maximum(latents.std(axes), 1e-3)


def make_latent(video: np.ndarray, video_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A uint8 clip [T', S, S, 3] as stored: projected to C' channels and normalised, float32 [T', H', W', C']."""
    shift, scale = _normalisation(tuple(video_shape), seed)
    return ((_project(video, video_shape, seed) - shift) / scale).astype(np.float32)


def to_rgb(latents: np.ndarray, config: LatentTextConfig) -> np.ndarray:
    """Latents [..., T', H', W', C'] of this dataset -> uint8 pixels [..., T', H', W', 3] (through the projection's
    pseudo-inverse; exact on stored latents when C' >= 3). For looking at samples."""
    shift, scale = _normalisation(tuple(config.video_shape), config.seed)
    rgb = (np.asarray(latents, np.float32) * scale + shift) @ np.linalg.pinv(_projection(config.seed, scale.size))
    return np.clip(np.round((rgb + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_example(config: LatentTextConfig, split: str, index: int) -> dict:
    """One example exactly as stored (a function of the config, the split and the index only)."""
    rng = ms.example_rng(config.seed, split, index)
    label, clip = _render_clip(rng, config.video_shape)
    colour, shape, direction = ms.split_label(label)
    words = caption_words(rng, clip, colour, shape, direction, _render_size(config.video_shape))
    text, text_mask = embed_text(words, config.text_len, config.text_dim, config.seed)
    return {
        "video": make_latent(clip["video"], config.video_shape, config.seed),
        "text": text,
        "text_mask": text_mask,
        "caption": " ".join(words),
        "label": label,
    }


def latent_stats(config: LatentTextConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std [C'] of a split's stored latents (rendered again, no text: cheap)."""
    total = np.zeros(config.video_shape[3], np.float64)
    squares = np.zeros_like(total)
    num = config.num_train if split == "train" else config.num_test
    for i in range(num):
        rng = ms.example_rng(config.seed, split, i)
        latent = make_latent(_render_clip(rng, config.video_shape)[1]["video"], config.video_shape, config.seed)
        flat = latent.reshape(-1, latent.shape[-1]).astype(np.float64)
        total += flat.sum(0)
        squares += (flat**2).sum(0)
    count = num * int(np.prod(config.video_shape[:3]))
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


# ---------------------------------------------------------------- the TFDS builder


class SyntheticLatentText(tfds.core.GeneratorBasedBuilder):
    """moving_shapes clips as float latents with precomputed text embeddings and masks of their captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [builder_config((16, 32, 32, 4), 120, 4096)]  # configs/bench.py:S2; any other via a config
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
    # TFDS 4.9.10 derives this via `importlib_resources`, which is only installed on Python < 3.9; give it directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        zlib_tensor = lambda shape, dtype: tfds.features.Tensor(
            shape=shape, dtype=dtype, encoding=tfds.features.Encoding.ZLIB
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "video": zlib_tensor(tuple(c.video_shape), np.float32),  # latents [T', H', W', C']
                    "text": zlib_tensor((c.text_len, c.text_dim), np.float32),  # embeddings [L, D]
                    "text_mask": tfds.features.Tensor(shape=(c.text_len,), dtype=np.bool_),  # True = a real token
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=[ms.caption_for(i) for i in range(ms.NUM_CLASSES)]),
                }
            ),
            metadata=tfds.core.MetadataDict(),  # latent_mean / latent_std [C'] of the train split
            disable_shuffling=True,  # record i is example i: reproducible and checkable against make_example
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        mean, std = latent_stats(c, "train")
        self.info.metadata.update(latent_mean=mean.tolist(), latent_std=std.tolist())
        return {
            "train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test),
        }

    def _generate_examples(self, split: str, num: int):
        for i in range(num):
            yield i, make_example(self.builder_config, split, i)


def _builder(data_dir, config: LatentTextConfig) -> SyntheticLatentText:
    return SyntheticLatentText(config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare(data_dir, config: LatentTextConfig) -> SyntheticLatentText:
    """The builder for `config` under `data_dir`, generating its array_record files first if they are missing."""
    builder = _builder(data_dir, config)
    builder.download_and_prepare(file_format="array_record")  # no-op when already prepared
    return builder


def data_source(data_dir, config: LatentTextConfig, split: str = "train"):
    """A random-access data source of a prepared split (call `prepare` first): `len()` and `[i]` -> dict."""
    builder = _builder(data_dir, config)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{NAME}/{config.name} is not prepared under data dir {os.fspath(data_dir)!r}; call latent_text.prepare"
        )
    return builder.as_data_source(split)
