"""Random-access views of a data source (`len`, `source[i]` -> dict): what a run reads that the dataset does not store.

    source = tfds.data_source("moving_shapes/8x16", split="train", data_dir=...)
    source = WithoutLabels(source, excluded=(5, 17))                  # held-out classes left out of training
    source = Tokenized(source, moving_shapes.VOCABULARY, length=8)    # + "tokens" int32 [8], "text_mask" bool [8]

Both are plain sources again, so `vdit_jax.data.pipeline.make_dataset` (grain) reads them like any other, and its
checks (shapes, dtypes, bad records skipped and counted) apply to the fields they add.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from absl import logging

from vdit_jax.models import text as text_lib

CAPTION_KEY = "caption"  # DESIGN.md §4


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Tokenized:
    """`source[i]` plus "tokens" int32 [length] and "text_mask" bool [length] (True = a real token): its caption
    (`caption_key`) encoded by the built-in tokenizer (`vdit_jax.models.text.Tokenizer`: `<bos>`, the words, padding).

    Raises ValueError (on construction, from record 0, and on any record read) for a caption with a word outside
    `vocabulary` or longer than `length - 1` words, naming it; a record without the caption is a KeyError naming the
    record's keys. In a grain pipeline a record that raises is skipped and counted as bad.
    """

    def __init__(self, source, vocabulary: Sequence[str], length: int, caption_key: str = CAPTION_KEY):
        self._source = source
        self._tokenizer = text_lib.Tokenizer(vocabulary)
        self._length = int(length)
        self._key = caption_key
        if len(source):
            self[0]  # a wrong caption key, vocabulary or length fails here, once, not as skipped records

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[index])
        if self._key not in record:
            raise KeyError(f"record {index} has no {self._key!r} to tokenize; its keys: {sorted(record)}")
        tokens, mask = self._tokenizer.encode([_decode(record[self._key])], self._length)
        record["tokens"], record["text_mask"] = tokens[0], mask[0]
        return record

    def __repr__(self) -> str:
        return f"Tokenized({self._source!r}, length={self._length})"


class WithoutLabels:
    """The records of `source` whose `label_key` is not in `excluded`, in order (held-out classes: a model trained
    on this view never sees them). The labels are read once, on construction (every record: a few seconds for
    10,000 moving_shapes clips).

    Raises ValueError when nothing is left, naming the excluded labels.
    """

    def __init__(self, source, excluded: Sequence[int], label_key: str = "label"):
        self._source = source
        excluded = {int(y) for y in excluded}
        start = time.perf_counter()
        labels = np.array([int(source[i][label_key]) for i in range(len(source))], np.int64)
        self._keep = np.flatnonzero(~np.isin(labels, sorted(excluded)))
        logging.info(
            "left out %d of %d records (labels %s) in %.1f s",
            len(source) - len(self._keep),
            len(source),
            sorted(excluded),
            time.perf_counter() - start,
        )
        if len(self._keep) == 0:
            raise ValueError(f"excluding labels {sorted(excluded)} leaves none of the {len(source)} records")

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: int) -> dict:
        return self._source[int(self._keep[index])]

    def __repr__(self) -> str:
        return f"WithoutLabels({self._source!r}, {len(self._keep)} kept)"
