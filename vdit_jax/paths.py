"""Paths of runs and datasets as `etils.epath` paths: local directories and `gs://` (any fsspec URL) alike.

    workdir = paths.resolve("gs://bucket/run")   # epath.Path('gs://bucket/run'), left as it is
    workdir = paths.resolve("runs/demo")         # epath.Path('/abs/cwd/runs/demo')

Local paths are made absolute (each host of a pod resolves its own working directory); URLs are never touched
(`os.path.abspath("gs://b/r")` would give the local directory `./gs:/b/r`). `gs://` needs `gcsfs` (the `tpu` extra).
"""

from __future__ import annotations

import io
import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on the local file system (no `scheme://` prefix, or `file://`)."""
    text = os.fspath(path)
    return not _URL.match(text) or text.startswith("file://")


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: absolute when local, unchanged when a URL such as `gs://bucket/dir`."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_local(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    return epath.Path(text)


def write_bytes_atomic(path: epath.Path, data: bytes) -> None:
    """Writes `data` to `path` so that a reader never sees a half-written file.

    Local: a temporary file in the same directory, then `os.replace`. Object stores (`gs://`): one upload, which
    is atomic there (an object appears whole or not at all).
    """
    path = epath.Path(path)
    if is_local(path):
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


def savez_compressed(path: epath.Path, **arrays) -> None:
    """`np.savez_compressed` to any epath path (built in memory, then written in one piece)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())
