"""Which dataset a config names, opened as a grain pipeline; captions, prompts and sampling conditions.

`config.data.name` picks the dataset:
  moving_shapes           built on first use (builder config `data.builder_config`): uint8 videos, labels, captions
  synthetic_latent_text   built on first use from the config's shapes (`data.video_shape`, `data.text_len`,
                          `model.text_dim`; `data.builder_config` is not used): float latents, text embeddings and
                          masks, captions, labels (`vdit_jax.data.latent_text`)
  anything else           a TFDS dataset already prepared as array_record under the data dir; its video feature
                          key, shape and label key come from `config.data`, and text models read its `text` and
                          `text_mask` features

The data dir must be a local path: array_record's writer cannot write to GCS (a gs:// workdir is fine; its data dir
defaults to `default_data_dir()`, a local cache).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vdit_jax import cli, paths
from vdit_jax.data import latent_text, moving_shapes, pipeline, views

MOVING_SHAPES = moving_shapes.NAME
SYNTHETIC_LATENT_TEXT = latent_text.NAME
BUILT_IN = (MOVING_SHAPES, SYNTHETIC_LATENT_TEXT)  # datasets this package builds itself
SAMPLE_SPLIT = "test"  # where the texts of training-time and CLI samples are drawn from
DATA_DIR_ENV = "VDIT_DATA_DIR"


def default_data_dir() -> str:
    """`$VDIT_DATA_DIR` if set, else `~/.cache/vdit_jax/data`: a local directory shared by runs."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vdit_jax", "data")


def check_local(data_dir) -> str:
    """`data_dir` as an absolute local path string.

    Raises:
      cli.UsageError (a ValueError): `data_dir` is a URL (gs://, s3://, ...); the CLIs print it as one line.
    """
    path = os.fspath(data_dir)
    if not paths.is_local(path):
        raise cli.UsageError(
            f"data dir {path!r} must be a local path: datasets are built and read with array_record, which cannot "
            f"write to {path.split('://')[0]}:// (the workdir can be on GCS); use a local directory: --data_dir, "
            f"config.data.data_dir or ${DATA_DIR_ENV} (default {default_data_dir()!r})"
        )
    return os.fspath(paths.resolve(path))


def latent_text_config(config: ml_collections.ConfigDict) -> latent_text.LatentTextConfig:
    """The synthetic_latent_text builder config of a run's shapes."""
    return latent_text.builder_config(tuple(config.data.video_shape), config.data.text_len, config.model.text_dim)


def open_source(config: ml_collections.ConfigDict, data_dir, split: str | None = None):
    """A random-access source of the configured dataset's split (default `config.data.split`), building a
    built-in dataset first if needed (process 0 first when there are several)."""
    return _open(config, check_local(data_dir), split or config.data.split, prepare=True)


def _open(config, data_dir: str, split: str, *, prepare: bool):
    d = config.data
    if d.name == MOVING_SHAPES:
        if prepare:
            _process_0_first(lambda: moving_shapes.prepare(data_dir, d.builder_config))
        return moving_shapes.data_source(data_dir, d.builder_config, split)
    if d.name == SYNTHETIC_LATENT_TEXT:
        builder_config = latent_text_config(config)
        if prepare:
            _process_0_first(lambda: latent_text.prepare(data_dir, builder_config))
        return latent_text.data_source(data_dir, builder_config, split)
    if not os.path.isdir(os.path.join(data_dir, d.name)):
        raise FileNotFoundError(
            f"dataset {d.name!r} is not prepared under data dir {data_dir!r}; prepare it with "
            f"file_format='array_record' (or use config.data.name in {list(BUILT_IN)})"
        )
    return tfds.data_source(d.name, split=split, data_dir=data_dir)


def _process_0_first(prepare) -> None:
    """Runs `prepare` on process 0, then on the others (a no-op on a shared file system, a local build otherwise),
    so that several processes never build into the same directory at once."""
    import jax

    if jax.process_count() == 1:
        prepare()
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        prepare()
    multihost_utils.sync_global_devices("vdit_jax_prepare_dataset")
    if jax.process_index() != 0:
        prepare()


def builtin_text(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's model encodes text itself (`model.text_vocab`: tokens of the captions) rather than
    reading precomputed embeddings."""
    return bool(config.model.get("text_vocab"))


def text_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """The text fields a config's model reads, with their per-example shapes ({} for a model without text):
    `tokens` [L] and `text_mask` [L] for the built-in encoder, `text` [L, text_dim] and `text_mask` [L] else."""
    length = config.data.text_len
    if not length:
        return {}
    if builtin_text(config):
        return {"tokens": (length,), "text_mask": (length,)}
    return {"text": (length, config.model.text_dim), "text_mask": (length,)}


def with_tokens(config: ml_collections.ConfigDict, source):
    """`source` with "tokens" and "text_mask" from its captions for a built-in-text model (`views.Tokenized`);
    `source` itself for any other model."""
    if not builtin_text(config):
        return source
    return views.Tokenized(source, tuple(config.model.text_vocab), config.data.text_len)


def encode_prompts(config: ml_collections.ConfigDict, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, data.text_len], text_mask bool [N, data.text_len]) of free-text prompts for a built-in-text
    model. Raises cli.UsageError for a word outside the model's vocabulary or a prompt longer than its text length
    (refused, not truncated: see `vdit_jax.models.text`), naming both."""
    from vdit_jax.models import text as text_lib

    try:
        return text_lib.Tokenizer(tuple(config.model.text_vocab)).encode(list(prompts), config.data.text_len)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def make_train_dataset(
    config: ml_collections.ConfigDict, data_dir, *, process_index=None, process_count=None
) -> pipeline.grain.IterDataset:
    """The shuffled, repeated, per-process-sharded training pipeline; its batches hold exactly what the model
    reads: `video` float32 [b, T, H, W, C] (pixels in [-1, 1] or latents), `label` int32 [b] when
    `data.label_key` is set, `text` float32 [b, L, D] (or, for the built-in encoder, `tokens` int32 [b, L]) and
    `text_mask` bool [b, L] when `data.text_len > 0`. The labels of `data.exclude_labels` are left out."""
    import jax

    d = config.data
    source = open_source(config, data_dir)
    if d.exclude_labels:
        source = views.WithoutLabels(source, tuple(d.exclude_labels), d.label_key)
    return pipeline.make_dataset(
        with_tokens(config, source),
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        feature_key=d.feature_key,
        label_key=d.label_key or None,
        num_frames=d.num_frames or None,
        frame_stride=d.frame_stride,
        video_shape=tuple(d.video_shape),
        extra_shapes=text_shapes(config),
    )


def sample_labels(num: int, num_classes: int) -> np.ndarray:
    """`num` labels spread evenly over all classes (each class once before any repeats); zeros without classes."""
    if num_classes == 0:
        return np.zeros((num,), np.int32)
    return (np.arange(num) * num_classes // num).astype(np.int32)


def sample_conditions(config: ml_collections.ConfigDict, data_dir, num: int, seed: int = 0) -> dict:
    """What `num` samples are conditioned on, and their captions.

    Text models: texts drawn (without repeats until the split is used up, by `seed`) from the dataset's test split
    (or `config.data.split` when it has none): {"text": float32 [num, L, D], "text_mask": bool [num, L],
    "captions": list of str, "labels": int32 [num] (the records' labels when the model also takes classes, else
    zeros)}; built-in-text models get "tokens" int32 [num, L] instead of "text" (on moving_shapes: the captions of
    every class in turn, as `sample_labels` spreads labels). Other models: {"labels": `sample_labels`,
    "captions": their `caption`s}. On several processes the dataset must already be prepared (training prepares
    it): this may run on one process only.
    """
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    mc = config.model
    if not mc.text_dim:
        labels = sample_labels(num, mc.num_classes)
        return {"labels": labels, "captions": [caption(config, int(y)) for y in labels]}
    if builtin_text(config) and config.data.name == MOVING_SHAPES:  # every class's caption before any repeats
        captions = [moving_shapes.caption_for(int(y)) for y in sample_labels(num, moving_shapes.NUM_CLASSES)]
        tokens, mask = encode_prompts(config, captions)
        labels = sample_labels(num, mc.num_classes)
        return {"tokens": tokens, "text_mask": mask, "captions": captions, "labels": labels}
    records, order = _draw_records(config, data_dir, num, seed)
    if builtin_text(config):
        records = [with_tokens(config, [r])[0] for r in records]
    shapes = text_shapes(config)
    out = {}
    for key, shape in shapes.items():
        missing = [r for r in records if key not in r]
        if missing:
            raise ValueError(f"dataset {config.data.name!r} has no {key!r} feature; available: {sorted(missing[0])}")
        value = np.stack([np.asarray(r[key]) for r in records])
        if value.shape[1:] != shape:
            raise ValueError(
                f"dataset {config.data.name!r} has {key!r} of shape {value.shape[1:]}, but the model needs {shape} "
                "(config.data.text_len, config.model.text_dim)"
            )
        out[key] = value.astype({"text_mask": bool, "tokens": np.int32}.get(key, np.float32))
    label_key = config.data.label_key
    if mc.num_classes and label_key:
        out["labels"] = np.array([r[label_key] for r in records], np.int32)
    else:
        out["labels"] = np.zeros((num,), np.int32)
    out["captions"] = [_text(r.get("caption", f"{config.data.name} record {i}")) for r, i in zip(records, order)]
    return out


def _draw_records(config, data_dir, num: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """`num` records of the sampling split, drawn by `seed` without repeats until the split is used up."""
    import jax

    data_dir = check_local(data_dir)
    source = _open(config, data_dir, _sample_split(config, data_dir), prepare=jax.process_count() == 1)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(source)) for _ in range(-(-num // len(source)))])[:num]
    return [source[int(i)] for i in order], order


def test_clips(config: ml_collections.ConfigDict, data_dir, num: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(videos [num, T, H, W, C] as stored (uint8 pixels for moving_shapes; every frame, not cropped), captions) of
    `num` records of the test split (`config.data.split` for a dataset without one), drawn as `sample_conditions`
    draws them."""
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    records, order = _draw_records(config, data_dir, num, seed)
    key = config.data.feature_key
    videos = np.stack([np.asarray(r[key]) for r in records])
    return videos, [_text(r.get("caption", f"{config.data.name} record {i}")) for r, i in zip(records, order)]


def _sample_split(config, data_dir: str) -> str:
    if config.data.name in BUILT_IN:
        return SAMPLE_SPLIT
    splits = tfds.builder(config.data.name, data_dir=data_dir).info.splits
    return SAMPLE_SPLIT if SAMPLE_SPLIT in splits else config.data.split


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def moving_shapes_classes(config: ml_collections.ConfigDict) -> bool:
    """Whether the model's class labels are moving_shapes' (its data, or latents encoded from it)."""
    return config.data.name in BUILT_IN or config.latent.source.split("/")[0] == MOVING_SHAPES


def caption(config: ml_collections.ConfigDict, label: int) -> str:
    """The prompt text of a class label."""
    if moving_shapes_classes(config):
        return moving_shapes.caption_for(label)
    return f"class {label}"


def prompt_conditions(config: ml_collections.ConfigDict, prompt: str, num: int) -> dict:
    """Keyword arguments of `inference.sample` / `Pipeline.generate` for `num` videos of one prompt: the prompt
    itself for a model with the built-in text encoder ({"labels": None, "prompts": [...]}), its class label for a
    class-conditional moving_shapes model ({"labels": int32 [num]}). Raises cli.UsageError for a prompt the model
    cannot read (a model on precomputed embeddings needs them: `text_embeddings.read_npz`)."""
    if builtin_text(config):
        encode_prompts(config, [prompt])  # refused here, naming the word or the lengths
        return {"labels": None, "prompts": [prompt] * num}
    if config.model.get("text_dim"):
        raise cli.UsageError(
            "this model reads precomputed text embeddings: pass text and text_mask (vdit_jax.data.text_embeddings."
            "read_npz of a file its encoder wrote), not a free-text prompt"
        )
    return {"labels": np.full((num,), parse_prompt(config, prompt), np.int32)}


def parse_prompt(config: ml_collections.ConfigDict, prompt: str) -> int:
    """The class label of a prompt; raises cli.UsageError naming the prompt and the grammar."""
    if not moving_shapes_classes(config):
        raise cli.UsageError(f"--prompt works for moving_shapes models; this one was trained on {config.data.name!r}")
    try:
        return moving_shapes.parse_caption(prompt)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
