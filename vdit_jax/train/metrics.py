"""Training metrics: JSON lines, TensorBoard scalars and a console line; a throughput timer.

`workdir/metrics.jsonl` holds one JSON object a logged step, e.g.
`{"step": 100, "loss": 0.0831, "lr": 0.001}`; non-finite values are written as the strings
"nan", "inf" and "-inf" (`float()` reads them back), so every line stays valid JSON.
TensorBoard events go to `workdir/tb`. Only process 0 writes anything.

`workdir` may be any `etils.epath` path. Locally the JSONL file is appended to and flushed every line; on an object
store (`gs://`, where objects cannot be appended to) the writer keeps the lines and uploads the whole file at most
every `flush_secs` and on `flush()` / `close()`, so a preempted run loses at most that much of the log (the
checkpoint, not the log, is what a resume needs; resuming purges lines after the checkpoint anyway).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from vdit_jax import paths

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def to_python_scalar(name: str, value: Any) -> int | float:
    """A Python int/float from a Python, NumPy or JAX scalar (or size-1 array)."""
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int | float):
        return item
    raise ValueError(f"metric {name!r} must be a real number, got {item!r}")


def _json_value(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsWriter:
    """Writes scalar metrics of a step to JSONL, TensorBoard and the console.

    Args:
      workdir: the run directory; `metrics.jsonl` and `tb/` are created inside it.
      process_index: this process's index (default `jax.process_index()`); only 0 writes.
      purge_step: when resuming from a checkpoint at this step, drop the lines and events of
        steps >= `purge_step` left by the interrupted run, so each step appears once.
      console: also print one concise line a logged step to stdout (through `tqdm.write`, so
        it does not break a progress bar).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        process_index: int | None = None,
        purge_step: int | None = None,
        console: bool = True,
        flush_secs: float = 30.0,
    ):
        self.workdir = paths.resolve(workdir)
        self.active = (jax.process_index() if process_index is None else process_index) == 0
        self.console = console
        self.flush_secs = flush_secs
        self._file = None
        self._lines: list[bytes] | None = None  # object stores: the whole file, uploaded on flush
        self._last_upload = time.monotonic()
        self._tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        kept = _repair_jsonl(path, purge_step)
        if paths.is_local(path):
            self._file = open(path, "a", encoding="utf-8")  # Closed in close().
        else:
            self._lines = kept
        # Imported lazily: tensorboardX pulls in protobuf, which non-writing processes skip.
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            logdir=os.fspath(self.workdir / TB_DIR), purge_step=purge_step, flush_secs=int(flush_secs)
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar `metrics` (Python, NumPy or JAX scalars) for `step`."""
        if not self.active:
            return
        step = int(step)
        values = {name: to_python_scalar(name, v) for name, v in metrics.items()}
        if "step" in values:
            raise ValueError("'step' is reserved; pass it as the step argument")
        record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line.encode())
            if time.monotonic() - self._last_upload >= self.flush_secs:
                self._upload()
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), global_step=step)
        if self.console:
            parts = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            tqdm.tqdm.write(f"step {step} | {parts}", file=sys.stdout)

    def _upload(self) -> None:
        paths.write_bytes_atomic(self.workdir / METRICS_FILE, b"".join(self._lines))
        self._last_upload = time.monotonic()

    def flush(self) -> None:
        if not self.active:
            return
        if self._file is not None:
            self._file.flush()
        elif self._lines is not None:
            self._upload()
        self._tb.flush()

    def close(self) -> None:
        if not self.active or self._tb is None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._lines is not None:
            self._upload()
        self._tb.close()
        self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in order (non-finite strings become floats)."""
    records = []
    for line in (paths.resolve(workdir) / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for k, v in record.items():
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                record[k] = float(v)
        records.append(record)
    return records


def _repair_jsonl(path: epath.Path, purge_step: int | None) -> list[bytes]:
    """Drops a torn last line (a kill mid-write) and, with `purge_step`, steps >= it; returns the kept lines."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    keep = lines
    if purge_step is not None:
        keep = [ln for ln in lines if ln.strip() and _line_step(ln) < purge_step]
    if torn or len(keep) != len(lines):
        paths.write_bytes_atomic(path, b"".join(ln + b"\n" for ln in keep))
    return [ln + b"\n" for ln in keep]


def _line_step(line: bytes) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # An unparsable line is kept rather than silently lost.


def _fmt(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


class StepTimer:
    """Steps per second over a sliding window of recent ticks, and an ETA.

    Call `tick(step)` after each step (or each logged step); the first interval, which usually
    includes compilation, drops out of the window after `window` ticks.
    """

    def __init__(self, total_steps: int | None = None, *, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.total_steps = total_steps
        self._ticks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)

    def tick(self, step: int, now: float | None = None) -> None:
        self._ticks.append((time.perf_counter() if now is None else now, int(step)))

    @property
    def steps_per_s(self) -> float | None:
        """None until two ticks are in."""
        if len(self._ticks) < 2:
            return None
        (t0, s0), (t1, s1) = self._ticks[0], self._ticks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    @property
    def eta_s(self) -> float | None:
        """Seconds to `total_steps` at the current rate, or None when unknown."""
        rate = self.steps_per_s
        if self.total_steps is None or not rate:
            return None
        return max(self.total_steps - self._ticks[-1][1], 0) / rate


def format_duration(seconds: float | None) -> str:
    """E.g. '1:02:03' or '4:05'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
