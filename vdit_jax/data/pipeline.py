"""A grain input pipeline over any random-access video source (e.g. an array_record `tfds.data_source`).

    ds = pipeline.make_dataset(source, global_batch_size=32, seed=0,
                               process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)
    batch = next(it)        # {"video": float32 [b, T', H, W, C] in [-1, 1], "label": int32 [b]}, b = 32 // count
                            # (+ extra fields, e.g. extra_shapes={"text": (L, D), "text_mask": (L,)})
    state = it.get_state()  # JSON-able; `it.set_state(state)` resumes exactly (also via grain's orbax handler)
    it.num_skipped          # bad records skipped so far by this iterator (part of the state)

Stages (all lazy, random access until the last):
  source -> (record_index, record | _Bad)   reading never raises: a record that fails to decode is marked bad
  -> shuffle(seed) -> repeat(num_epochs)     a different permutation each epoch
  -> this process's rows of every global batch: global position g*B + p*b + r  (B global, b = B / P local)
  -> check + crop:                            wrong key/shape/dtype -> _Bad; a random temporal crop drawn from
                                              rng(seed, global position), so it is the same on every process count
  -> prefetch threads -> skip bad records (counted, logged) and batch b, converting uint8 -> float32 [-1, 1]

Videos are uint8 pixels (scaled to [-1, 1]) or float latents (passed through as float32). Extra fields (`text`
float [L, D], `text_mask` bool [L], ...) are checked like the video (shape and dtype of the source's features) and
batched under their own names: floats as float32, bools as bool, integers as int32.

With no bad records, process p's batch k is exactly rows [p*b, (p+1)*b) of global batch k, so the processes'
batches are disjoint and together form the global batch. A skipped record shifts that process's later rows by one
(they stay disjoint, but the "together equal the global batch" property no longer holds exactly); with
`num_epochs=None` (the default, as in training) every process still yields batches forever.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from absl import logging

_CROP_STREAM = 0x5EED  # separates the crop RNG stream from anything else seeded with (seed, position)
MAX_CONSECUTIVE_BAD = 1000  # more bad records in a row than this means the data is broken, not a few records


@dataclasses.dataclass(frozen=True)
class _Bad:
    """A record that could not be used; skipped (and counted) by the batching stage."""

    record_index: int
    reason: str


# ---------------------------------------------------------------- public entry point


def make_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    feature_key: str = "video",
    label_key: str | None = "label",
    num_frames: int | None = None,
    frame_stride: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    video_shape: tuple[int, ...] | None = None,
    extra_shapes: Mapping[str, tuple[int, ...] | None] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """This process's share of a shuffled, repeated, batched video pipeline.

    Args:
      source: random access (`len`, `[i]` -> dict), e.g. `tfds.data_source(...)` of an array_record dataset; the
        video feature is uint8 pixels or float latents [T, H, W, C].
      global_batch_size: B, the batch over all processes.
      seed: drives the shuffle and the temporal crops.
      process_index, process_count: this process gets b = B / process_count rows of every global batch.
      feature_key: the video feature; label_key: the integer class feature, or None (unconditional: no "label").
      num_frames: temporal crop length T' (None = as many frames as the stride allows: no crop at stride 1).
      frame_stride: take every k-th frame of the crop window (window length (T' - 1) * k + 1).
      shuffle: shuffle each epoch (False: source order).
      num_epochs: None repeats forever; otherwise the last incomplete global batch is dropped.
      video_shape: expected stored shape (T, H, W, C); default from the source's TFDS features, else record 0.
      extra_shapes: further features to batch under their own names, each with its expected stored shape (None =
        whatever the source's features say), e.g. {"text": (L, D), "text_mask": (L,)}; their dtypes come from the
        source's features (else record 0) and must be float, bool or integer.
      read_options: grain prefetch threads/buffer (default 4 threads, a buffer of a few batches).

    Returns:
      A `grain.IterDataset`; its iterators yield {"video": float32 [b, T', H, W, C] (uint8 pixels scaled to
      [-1, 1], float latents as stored), "label": int32 [b], and each extra field [b, ...]} and have `get_state()` /
      `set_state()` / `num_skipped`.
    """
    _check_positive(global_batch_size=global_batch_size, process_count=process_count, frame_stride=frame_stride)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count - 1}]")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}; "
            "use a multiple of the number of processes"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 (or None to repeat forever)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32)")
    if len(source) == 0:
        raise ValueError("the source is empty")

    specs = _feature_specs(source, feature_key, label_key, video_shape, extra_shapes or {})
    (shape, video_dtype), extras = specs[feature_key], tuple((k, *specs[k]) for k in (extra_shapes or {}))
    length = (shape[0] - 1) // frame_stride + 1 if num_frames is None else num_frames
    _check_positive(num_frames=length)
    window = (length - 1) * frame_stride + 1
    if window > shape[0]:
        raise ValueError(
            f"num_frames={length} with frame_stride={frame_stride} needs {window} frames, "
            f"but the videos have {shape[0]} (feature {feature_key!r} of shape {shape})"
        )
    local_batch = global_batch_size // process_count
    check = _CheckAndCrop(feature_key, label_key, shape, video_dtype, length, frame_stride, seed, extras)

    ds = grain.MapDataset.source(_SafeSource(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = _ProcessRows(ds, global_batch_size, process_index, process_count)
    ds = ds.map(check)
    read_options = read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(64, 4 * local_batch))
    ds = ds.to_iter_dataset(read_options)
    return _SkipBadAndBatch(ds, local_batch)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def _feature_specs(
    source, feature_key: str, label_key: str | None, video_shape, extra_shapes: Mapping[str, tuple[int, ...] | None]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of the video and extra features as stored, from the source's TFDS features (else record 0),
    checking that every key exists, the shapes are as expected, the video is uint8 or float and the extras float,
    bool or integer."""
    expected_shapes = {feature_key: video_shape, **extra_shapes}
    info = getattr(source, "dataset_info", None)
    features = getattr(info, "features", None)
    if features is not None and hasattr(features, "keys"):  # a TFDS FeaturesDict (not a collections Mapping)
        _check_keys(list(features.keys()), feature_key, label_key, extra_shapes)
        declared = {k: (tuple(features[k].shape), np.dtype(features[k].np_dtype)) for k in expected_shapes}
    else:
        record = source[0]
        _check_keys(list(record), feature_key, label_key, extra_shapes)
        declared = {k: (np.shape(record[k]), np.asarray(record[k]).dtype) for k in expected_shapes}
    out = {}
    for key, expected in expected_shapes.items():
        shape, dtype = declared[key]
        if expected is not None and None not in shape and tuple(expected) != tuple(shape):
            arg = "video_shape" if key == feature_key else f"extra_shapes[{key!r}]"
            raise ValueError(f"{arg}={tuple(expected)} but feature {key!r} has shape {tuple(shape)}")
        shape = tuple(expected) if expected is not None else shape
        if key == feature_key and not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
            raise ValueError(f"feature {key!r} has dtype {dtype}; the pipeline reads uint8 pixels or float latents")
        if key != feature_key and not (
            np.issubdtype(dtype, np.floating) or dtype == np.bool_ or np.issubdtype(dtype, np.integer)
        ):
            raise ValueError(f"feature {key!r} has dtype {dtype}; extra features must be float, bool or integer")
        if key == feature_key and len(shape) != 4:
            raise ValueError(f"feature {key!r} has shape {shape}; expected a fixed (T, H, W, C)")
        if any(d is None or d < 1 for d in shape):
            raise ValueError(f"feature {key!r} has shape {shape}; expected a fixed shape (give it explicitly)")
        out[key] = (tuple(int(d) for d in shape), dtype)
    return out


def _check_keys(keys: list[str], feature_key: str, label_key: str | None, extra_keys=()) -> None:
    named = [("feature_key", feature_key), ("label_key", label_key), *(("extra_shapes key", k) for k in extra_keys)]
    for what, key in named:
        if key is not None and key not in keys:
            raise ValueError(f"{what}={key!r} is not a feature of the source; available keys: {sorted(keys)}")


# ---------------------------------------------------------------- stages


class _SafeSource:
    """`source[i]` -> (i, record), or (i, _Bad) when reading/decoding the record raises."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            return index, self._source[index]
        except Exception as e:  # noqa: BLE001 - any decode failure of one record makes that record bad
            return index, _Bad(index, f"reading failed: {type(e).__name__}: {e}")

    def __repr__(self) -> str:
        return f"_SafeSource({self._source!r})"


class _ProcessRows(grain.MapDataset):
    """Process p's rows of every global batch: element j -> (global position, parent element).

    Global batch k is positions [k*B, (k+1)*B); process p takes [k*B + p*b, k*B + (p+1)*b). Incomplete global
    batches at the end of a finite dataset are dropped so that every process sees the same number of batches.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def _position(self, index: int) -> int:
        k, r = divmod(index, self._local)
        return k * self._global + self._offset + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        position = self._position(index)
        return position, self._parent[position]

    def __str__(self) -> str:
        return f"_ProcessRows(global_batch={self._global}, local_batch={self._local}, offset={self._offset})"


@dataclasses.dataclass(frozen=True)
class _CheckAndCrop:
    """(position, (record_index, record)) -> {"video": [T', H, W, C] as stored, "label": int32, extras...} or _Bad."""

    feature_key: str
    label_key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    num_frames: int
    frame_stride: int
    seed: int
    extras: tuple[tuple[str, tuple[int, ...], np.dtype], ...] = ()  # (key, shape, dtype)

    def __call__(self, item):
        position, (record_index, record) = item
        if isinstance(record, _Bad):
            return record
        if not isinstance(record, Mapping) or self.feature_key not in record:
            return _Bad(record_index, f"no feature {self.feature_key!r}")
        out = {}
        for key, shape, dtype in ((self.feature_key, self.shape, self.dtype), *self.extras):
            value = record.get(key)
            if shape == () and isinstance(value, int | float | bool | np.generic):  # a scalar feature
                value = np.asarray(value, dtype)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
                got = f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}"
                return _Bad(record_index, f"{key!r} is {got}, expected {dtype} {shape}")
            out[key] = value
        if self.label_key is not None:
            label = record.get(self.label_key)
            if not isinstance(label, int | np.integer) and not (
                isinstance(label, np.ndarray) and label.shape == () and np.issubdtype(label.dtype, np.integer)
            ):
                return _Bad(record_index, f"{self.label_key!r} is {label!r}, expected an integer")
            out["label"] = np.int32(label)
        window = (self.num_frames - 1) * self.frame_stride + 1
        start = 0
        if window < self.shape[0]:
            rng = np.random.default_rng([self.seed, _CROP_STREAM, position])
            start = int(rng.integers(self.shape[0] - window + 1))
        out["video"] = out.pop(self.feature_key)[start : start + window : self.frame_stride]
        return out


class _SkipBadAndBatch(grain.IterDataset):
    """Skips (counts, logs) bad records and stacks b good ones (`stack`)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> SkipBadAndBatchIterator:
        return SkipBadAndBatchIterator(self._parent.__iter__(), self._batch_size)

    def __str__(self) -> str:
        return f"SkipBadAndBatch(batch_size={self._batch_size})"


def stack(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Checked examples -> one batch: uint8 video -> float32 in [-1, 1] [b, T', H, W, C], float fields -> float32,
    bool fields stay bool, integer fields (the label) -> int32."""
    batch = {}
    for key in items[0]:
        value = np.stack([x[key] for x in items])
        if key == "video" and value.dtype == np.uint8:
            value = value.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        elif np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32)
        elif value.dtype != np.bool_:
            value = value.astype(np.int32)
        batch[key] = value
    return batch


class SkipBadAndBatchIterator(grain.DatasetIterator):
    """The iterator `make_dataset(...)` hands out; `num_skipped` counts bad records and is saved in the state."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self.num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        items, consecutive_bad = [], 0
        while len(items) < self._batch_size:
            item = next(self._parent, None)
            if item is None:  # end of a finite dataset: drop the incomplete batch
                raise StopIteration
            if isinstance(item, _Bad):
                self.num_skipped += 1
                consecutive_bad += 1
                logging.warning(
                    "skipping bad record %d (%s); %d skipped so far", *dataclasses.astuple(item), self.num_skipped
                )
                if consecutive_bad > MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(
                        f"more than {MAX_CONSECUTIVE_BAD} bad records in a row (last: record {item.record_index}, "
                        f"{item.reason}); the data source looks broken"
                    )
                continue
            consecutive_bad = 0
            items.append(item)
        return stack(items)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])

    def __str__(self) -> str:
        return f"SkipBadAndBatchIterator(batch_size={self._batch_size})"
