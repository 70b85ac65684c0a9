"""Precomputed text embeddings of a frozen external encoder (T5, UMT5, CLIP, ... run elsewhere): datasets and files.

    python -m vdit_jax.data.text_embeddings --source=moving_shapes/8x16 --encoder=my_pkg.t5:encode \
        --text_len=32 --name=moving_shapes_t5

writes the TFDS dataset `text_embedded/moving_shapes_t5` (array_record) under the data dir: every split of the
source with all its features, plus `text` float32 [text_len, D] and `text_mask` bool [text_len] (True = a real
token) of each record's `caption` (DESIGN.md §4). A config trains on it with `data.name =
"text_embedded/moving_shapes_t5"`, `data.text_len = text_len` and `model.text_dim = D`; the data pipeline reads it
like any prepared dataset, and `python -m vdit_jax.sample --text_embeddings=FILE.npz` samples from embeddings the
same encoder wrote with `write_npz`.

The encoder is any callable `encode(captions: list[str]) -> (embeddings float [N, L, D], mask bool [N, L])` (or
just the embeddings, every token real), named as `module:function` on the command line. A caption with more real
tokens than `text_len` is refused with a ValueError naming it and both lengths (as the built-in tokenizer refuses a
prompt that does not fit: a cut prompt silently means something else); shorter ones are padded with zeros, masked.
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "text_embedded"  # the TFDS dataset name; the builder config is the user's name
Encoder = Callable[[list[str]], object]


def load_encoder(spec: str) -> Encoder:
    """The callable `module:function` names. Raises ValueError for a malformed spec or a name that is not there."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"encoder {spec!r} must be 'module:function', e.g. 'my_pkg.t5:encode'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"encoder {spec!r} is not callable")
    return fn


def encode(encoder: Encoder, captions: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(text float32 [N, text_len, D], text_mask bool [N, text_len]): the encoder's output padded to text_len.

    Raises ValueError for an output of the wrong shape, or a caption with more real tokens than text_len.
    """
    captions = list(captions)
    out = encoder(captions)
    emb, mask = out if isinstance(out, tuple) else (out, None)
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 3 or len(emb) != len(captions):
        raise ValueError(f"the encoder must return embeddings [N={len(captions)}, L, D], got {emb.shape}")
    mask = np.ones(emb.shape[:2], bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != emb.shape[:2]:
        raise ValueError(f"the encoder's mask must be [N, L] = {emb.shape[:2]}, got {mask.shape}")
    lengths = mask.sum(1)
    too_long = np.flatnonzero(lengths > text_len)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"caption {captions[i]!r} encodes to {int(lengths[i])} tokens, more than text_len {text_len}; raise "
            "--text_len (captions are not truncated)"
        )
    text = np.zeros((len(captions), text_len, emb.shape[2]), np.float32)
    text_mask = np.zeros((len(captions), text_len), bool)
    for i in range(len(captions)):  # the real tokens first, in order (an encoder may pad on either side)
        real = emb[i][mask[i]]
        text[i, : len(real)] = real
        text_mask[i, : len(real)] = True
    return text, text_mask


def _caption(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TextEmbedded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A prepared dataset's records with `text` and `text_mask` of their captions (see the module docstring).

    Not registered: it is written by `write_dataset` and read back from its files (`tfds.data_source` builds a
    read-only builder from the stored dataset_info), so reading needs neither this class nor the encoder.
    """

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS 4.9.10 derives this via `importlib_resources`, which is only installed on Python < 3.9; give it directly.
    code_path = epath.Path(__file__)

    def __init__(
        self,
        *,
        name: str,
        source,
        encoder: Encoder,
        text_len: int,
        text_dim: int,
        batch_size: int,
        limits: dict,
        **kwargs,
    ):
        self._source = source  # {split: data source}, with `features` of the source builder
        self._encoder = encoder
        self._text_len = text_len
        self._batch_size = batch_size
        self._limits = limits
        self._dim = text_dim
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=self.VERSION), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = self._source["features"]
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{features!r} with precomputed text embeddings of the captions",
            features=tfds.features.FeaturesDict(
                {
                    **{k: features[k] for k in features.keys()},
                    "text": tfds.features.Tensor(
                        shape=(self._text_len, self._dim), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "text_mask": tfds.features.Tensor(shape=(self._text_len,), dtype=np.bool_),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._source["splits"]}

    def _generate_examples(self, split: str):
        source = self._source["splits"][split]
        num = len(source) if self._limits.get(split) is None else min(len(source), self._limits[split])
        for start in range(0, num, self._batch_size):
            records = [source[i] for i in range(start, min(num, start + self._batch_size))]
            text, mask = encode(self._encoder, [_caption(r["caption"]) for r in records], self._text_len)
            for j, record in enumerate(records):
                yield start + j, {**record, "text": text[j], "text_mask": mask[j]}


def write_dataset(
    data_dir,
    source: str,
    name: str,
    encoder: Encoder,
    text_len: int,
    *,
    batch_size: int = 64,
    max_examples: int | None = None,
) -> str:
    """Writes `text_embedded/<name>` under `data_dir` from the prepared TFDS dataset `source` ("name/config";
    moving_shapes is built first if needed) and returns the `config.data.name` to train on.

    Args:
      encoder: see the module docstring. text_len: L of `text` / `text_mask`.
      batch_size: captions per encoder call. max_examples: the first N records of every split (None = all).

    Raises:
      ValueError: a source without a `caption` feature, a name TFDS refuses, a bad encoder output or a caption too
        long (from `encode`); FileExistsError: the dataset exists (delete it to rebuild: nothing is overwritten).
    """
    from vdit_jax.data import moving_shapes

    data_dir = os.fspath(data_dir)
    if text_len < 1 or batch_size < 1:
        raise ValueError(f"text_len={text_len} and batch_size={batch_size} must be >= 1")
    target = epath.Path(data_dir) / NAME / name
    if target.exists():
        raise FileExistsError(f"{target} exists; delete it to write the dataset again")
    source_name, _, source_config = source.partition("/")
    if source_name == moving_shapes.NAME:
        moving_shapes.prepare(data_dir, source_config or moving_shapes.MovingShapes.DEFAULT_CONFIG_NAME)
    builder = tfds.builder(source, data_dir=data_dir)
    if "caption" not in builder.info.features.keys():
        raise ValueError(f"{source} has no 'caption' feature; features: {sorted(builder.info.features.keys())}")
    splits = {s: tfds.data_source(source, split=s, data_dir=data_dir) for s in builder.info.splits}
    first = next(iter(splits.values()))[0]
    text_dim = encode(encoder, [_caption(first["caption"])], text_len)[0].shape[2]  # D, from one caption
    out = TextEmbedded(
        name=name,
        source={"features": builder.info.features, "splits": splits},
        encoder=encoder,
        text_len=text_len,
        text_dim=text_dim,
        batch_size=batch_size,
        limits={s: max_examples for s in splits},
        data_dir=data_dir,
        file_format="array_record",
    )
    out.download_and_prepare(file_format="array_record")
    return f"{NAME}/{name}"


# ---------------------------------------------------------------- sampling files


def write_npz(path, text: np.ndarray, text_mask: np.ndarray, prompts: Sequence[str] | None = None) -> None:
    """Writes what `python -m vdit_jax.sample --text_embeddings=PATH` reads: `text` float32 [N, L, D], `text_mask`
    bool [N, L] and, if given, `prompts` (the captions, for the samples' names and the evaluator)."""
    arrays = {"text": np.asarray(text, np.float32), "text_mask": np.asarray(text_mask, bool)}
    if prompts is not None:
        arrays["prompts"] = np.asarray(list(prompts), str)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    epath.Path(path).write_bytes(buffer.getvalue())


def read_npz(path, text_dim: int) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(text float32 [N, L, text_dim], text_mask bool [N, L], prompts or None) of an embeddings file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not an .npz with `text` [N, L, text_dim] and `text_mask` bool [N, L] (the message names what it
        holds and what the model needs), or a row with no real token.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--text_embeddings {path}: no such file")
    try:
        data = dict(np.load(io.BytesIO(path.read_bytes()), allow_pickle=False))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise ValueError(f"--text_embeddings {path} is not an .npz: {type(e).__name__}: {e}") from None
    if "text" not in data or "text_mask" not in data:
        raise ValueError(f"--text_embeddings {path} needs arrays 'text' and 'text_mask'; it has {sorted(data)}")
    text, mask = data["text"], data["text_mask"]
    if text.ndim != 3 or text.shape[2] != text_dim or not np.issubdtype(text.dtype, np.floating) or not len(text):
        raise ValueError(
            f"--text_embeddings {path}: 'text' is {text.dtype} {text.shape}, but the model needs float [N >= 1, L, "
            f"{text_dim}] (model.text_dim)"
        )
    if mask.dtype != bool or mask.shape != text.shape[:2]:
        raise ValueError(
            f"--text_embeddings {path}: 'text_mask' is {mask.dtype} {mask.shape}, needs bool {text.shape[:2]}"
        )
    empty = np.flatnonzero(~mask.any(1))
    if empty.size:
        raise ValueError(f"--text_embeddings {path}: row {int(empty[0])} of 'text_mask' has no real token")
    prompts = [str(p) for p in data["prompts"].ravel()] if "prompts" in data else None
    if prompts is not None and len(prompts) != len(text):
        raise ValueError(f"--text_embeddings {path}: {len(prompts)} prompts for {len(text)} texts")
    return text.astype(np.float32), mask, prompts


def main(argv) -> None:
    from absl import flags

    from vdit_jax import cli
    from vdit_jax.data import sources

    del argv
    f = flags.FLAGS
    cli.setup_logging()

    def run():
        data_dir = sources.check_local(f.data_dir or sources.default_data_dir())
        try:
            encoder = load_encoder(f.encoder)
            name = write_dataset(
                data_dir, f.source, f.name, encoder, f.text_len, batch_size=f.batch_size, max_examples=f.max_examples
            )
        except ValueError as e:  # a bad encoder output or a caption too long: one line
            raise cli.UsageError(str(e)) from None
        print(
            f"wrote {name} under {data_dir}: train with --config.data.name={name} --config.data.text_len={f.text_len}"
        )

    cli.run_guarded(run)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("source", None, "A prepared TFDS dataset with captions, 'name/config' (moving_shapes/8x16).")
    flags.DEFINE_string("encoder", None, "The text encoder, 'module:function' (see the module docstring).")
    flags.DEFINE_string("name", None, "The new dataset's config name: it is written as text_embedded/NAME.")
    flags.DEFINE_integer("text_len", None, "L: tokens per caption (padded, never truncated).")
    flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.")
    flags.DEFINE_integer("max_examples", None, "Only the first N records of every split.")
    flags.DEFINE_string("data_dir", None, "Local data dir (default: $VDIT_DATA_DIR or ~/.cache/vdit_jax/data).")
    flags.mark_flags_as_required(["source", "encoder", "name", "text_len"])
    app.run(main)
