"""Orbax checkpoints of the train state, the grain iterator and the config, plus preemption.

A checkpoint is one step directory under `directory` with three items::

  <directory>/<step>/state/    the train-state pytree (orbax StandardSave: OCDBT + zarr)
  <directory>/<step>/data/     the grain iterator state, one JSON file a process
  <directory>/<step>/config/   the config as JSON
  <directory>/<step>/lora/     LoRA runs only: the adapter's metadata as JSON (`models.lora.describe` of its base,
                               the base's workdir, step and model config; `vdit_jax.train.finetune`)

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<timestamp>` and renames it when every item
is complete, so a save interrupted at any moment (`kill -9`, preemption) leaves only a temporary
directory that is never listed or restored.

Random keys: typed keys (`jax.random.key`) and raw `uint32` keys (`jax.random.PRNGKey`) both
round-trip through orbax 0.12 unchanged, with their dtype; nothing needs wrapping.

Multi-host: every process calls `save`/`restore`/`wait` (orbax coordinates the writes and the
primary-host-only steps). `PreemptionGuard` is per process (the single-process trainer uses it); on
a pod, where only some hosts may receive SIGTERM, the trainer asks `reached_preemption(step)` every
step instead (JAX's preemption sync point, started by `jax.distributed.initialize`, whose SIGTERM
handler must not be replaced by a Python one), so that all hosts save and stop at the same step.

Storage: `directory` may be any `etils.epath` path (`gs://` included; orbax then marks a finished
step with a commit file instead of a rename). A failed read sets a checkpoint aside only when its
files are shown to be missing or garbled (`is_unreadable`); any other error stops with
`CheckpointReadError` and moves nothing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vdit_jax import paths

STATE = "state"
DATA = "data"
CONFIG = "config"
LORA = "lora"
ITEM_NAMES = (STATE, DATA, CONFIG, LORA)
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
    """No checkpoint under the directory could be restored."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint failed for a reason other than damaged files (a transient storage error, a permission
    error, a state that does not match the checkpoint): nothing was set aside; fix the cause and run again."""


# How a failed read is classified (`_is_unreadable`): only damaged or missing files set a checkpoint aside.
# Tensorstore (orbax's array storage) reports absl status codes in its messages.
_DAMAGED_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_TRANSIENT_CODES = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
)


def config_to_json_dict(config: Any) -> dict:
    """A JSON-safe dict from an `ml_collections.ConfigDict` or a mapping.

    Values JSON cannot hold (dtypes, callables, ...) are written as their `str`.
    """
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"config must be an ml_collections.ConfigDict or a mapping, got {type(config)}")


class Checkpointer:
    """Saves and restores train state, data-iterator state and config with orbax.

    Args:
      directory: where step directories live (created if missing); nothing is written
        outside it.
      max_to_keep: how many of the newest checkpoints to keep (`None`: keep all).
      save_interval_steps: `save` writes only at multiples of this, unless `force=True`.
      async_save: write arrays in a background thread; `save` returns once they are copied
        off the devices, so the caller may donate or overwrite the state straight away.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1000,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any = None,
        config: Any = None,
        *,
        force: bool = False,
        lora_metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Starts saving `state` (and the iterator, config and a LoRA adapter's metadata, when given) as `step`.

        Without `force`, writes only when `step` is a multiple of `save_interval_steps` (or at a
        multi-host preemption sync point; orbax also writes the first save of a directory
        that holds no checkpoint yet). With `force`, writes unless `step` is already saved.
        The iterator state is captured before this returns. Returns whether a save started.
        """
        step = int(step)
        if force and step in self.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config_to_json_dict(config))
        if lora_metadata is not None:
            items[LORA] = ocp.args.JsonSave(dict(lora_metadata))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would write."""
        return self._manager.should_save(int(step))

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption sync point (needs `jax.distributed.initialize`)."""
        return self._manager.reached_preemption(int(step))

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises if one failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest saved step (one still being written by this object included), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        """Saved steps, ascending, with any this object is still writing; never the temporary
        directory an interrupted save left behind."""
        return sorted(self._manager.all_steps())

    # --------------------------------------------------------------- restore

    def restore(
        self, abstract_state: Any, data_iterator: Any = None, step: int | None = None, *, partial: bool = False
    ) -> tuple[int, Any]:
        """Restores `(step, state)` onto the shardings of `abstract_state`.

        `abstract_state` is the state's pytree with `jax.ShapeDtypeStruct` leaves carrying a
        `.sharding` (or concrete arrays): a checkpoint written on any mesh restores onto it.
        `data_iterator`, when given, is moved in place to the saved position.

        With `partial=True`, `abstract_state` is a nested dict of some of the saved fields (a `TrainState` is saved
        as a dict of its fields), e.g. `{"ema_params": ...}`: only those arrays are read, the rest of the saved
        state (whatever its structure) is neither read nor allocated, and that dict comes back.

        With `step=None` restores the newest checkpoint. If that one is shown to be unreadable (files missing,
        truncated or garbled: see `is_unreadable`) it logs a warning naming the step and the error and tries the
        one before; skipped unreadable checkpoints are then renamed to `<step>.corrupt` inside the directory (kept
        for inspection, never deleted) so later saves of those step numbers succeed. Any other error (a transient
        storage error, a permission error, a state that does not match the checkpoint) stops at once and moves
        nothing: it is not evidence that the checkpoint is bad. With an explicit `step`, that step or an error.

        Raises:
          FileNotFoundError: there is no checkpoint.
          CheckpointReadError: a read failed for another reason than damaged files; nothing was moved.
          CheckpointError: every checkpoint is unreadable (each step's error is listed); nothing was moved.
        """
        self._manager.wait_until_finished()
        if step is not None:
            step = int(step)
            if step not in self.all_steps():
                raise FileNotFoundError(
                    f"No checkpoint for step {step} in {self.directory}; available steps: {list(self.all_steps())}"
                )
            return step, self._restore_step(step, abstract_state, data_iterator, partial)

        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        failures: list[tuple[int, Exception]] = []
        for i, candidate in enumerate(steps):
            error: Exception | None = None
            try:
                state = self._restore_step(candidate, abstract_state, data_iterator, partial)
            except Exception as e:  # classified below: only damaged files mean "try the previous checkpoint"
                state, error = None, e
            if error is not None and is_unreadable(error):
                # Orbax reports a directory it may not list as missing: damage only counts if every file opens.
                access_error = _access_error(self.directory / str(candidate))
                if access_error is not None:
                    error = access_error
            verdict = _OK if error is None else (_DAMAGED if is_unreadable(error) else _OTHER)
            verdict = _worst_over_processes(verdict)
            if verdict == _OK:
                if failures:
                    self._quarantine([s for s, _ in failures])
                return candidate, state
            if verdict == _OTHER:
                why = f"{type(error).__name__}: {_short(error)}" if error is not None else "failed on another process"
                raise CheckpointReadError(
                    f"Could not read the checkpoint at step {candidate} in {self.directory} ({why}). This is not a "
                    "damaged checkpoint (no file is missing or garbled), so every checkpoint was left in place: fix "
                    "the cause (storage access, credentials, or a config that no longer matches the checkpoint) "
                    "and run again."
                ) from None
            failures.append((candidate, error or CheckpointError("unreadable on another process")))
            _, error = failures[-1]
            logging.warning(
                "Checkpoint at step %d in %s is unreadable (%s: %s); %s.",
                candidate,
                self.directory,
                type(error).__name__,
                _short(error),
                "falling back to the previous one" if i + 1 < len(steps) else "none older",
            )
        listing = "\n".join(f"  step {s}: {type(e).__name__}: {_short(e)}" for s, e in failures)
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored: every checkpoint has missing or damaged files "
            f"(all left in place):\n{listing}"
        )

    def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any, partial: bool = False) -> Any:
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            state_args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        items = {STATE: state_args}
        if data_iterator is not None:
            if (self.directory / str(step) / DATA).exists():
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                logging.warning(
                    "Checkpoint at step %d in %s holds no data-iterator state; the iterator starts from its beginning.",
                    step,
                    self.directory,
                )
        if not partial:
            return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        # Orbax binds an item to one kind of handler per manager (this one's state item to StandardSave / Restore
        # once used): a partial read goes through a read-only manager of its own.
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        with ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES) as reader:
            return reader.restore(step, args=ocp.args.Composite(**items))[STATE]

    def _quarantine(self, steps: Sequence[int]) -> None:
        """Renames unreadable step directories out of orbax's sight (process 0 only)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
                if dst.exists():
                    dst = self.directory / f"{step}{CORRUPT_SUFFIX}-{time.time_ns()}"
                src.rename(dst)
                logging.warning("Moved unreadable checkpoint %s to %s.", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vdit_jax_checkpoint_quarantine")
        self._manager.reload()


def restore_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """Reads back the config saved with a checkpoint (the newest one by default) as a dict."""
    return restore_json(directory, CONFIG, step)


def restore_json(directory: str | os.PathLike, item: str, step: int | None = None) -> dict:
    """Reads back a JSON item (`CONFIG`, `LORA`) saved with a checkpoint (the newest one that has it by default)
    as a dict. Raises FileNotFoundError when the directory or the item is missing."""
    directory = paths.resolve(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, options=options, item_names=ITEM_NAMES) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            steps = [int(step)] if int(step) in steps else []
        steps = [s for s in steps if (directory / str(s) / item).exists()]
        if not steps:
            which = f"step {step}" if step is not None else "any checkpoint"
            raise FileNotFoundError(f"No saved {item} for {which} in {directory}.")
        restored = manager.restore(steps[0], args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item])


_OK, _DAMAGED, _OTHER = 0, 1, 2  # restore outcomes, ordered by severity


def _worst_over_processes(verdict: int) -> int:
    """The most severe restore outcome over all processes (all processes must call this)."""
    if jax.process_count() == 1:
        return verdict
    return int(np.max(multihost_utils.process_allgather(np.asarray(verdict, np.int32))))


def _access_error(step_dir: epath.Path) -> Exception | None:
    """The first error met opening the files under `step_dir` (listing every directory, reading a byte of every
    file), or None when all of them open: then a failed restore is down to their contents, not to access."""
    try:
        pending = [step_dir]
        while pending:
            for child in pending.pop().iterdir():
                if child.is_dir():
                    pending.append(child)
                else:
                    with child.open("rb") as f:
                        f.read(1)
    except FileNotFoundError:
        return None  # a missing file is damage
    except Exception as e:  # noqa: BLE001 - any other failure to open is an access problem, not damage
        return e
    return None


def is_unreadable(error: BaseException) -> bool:
    """Whether a restore error shows the checkpoint's files to be missing, truncated or garbled.

    True for missing files and undecodable contents (tensorstore's NOT_FOUND / DATA_LOSS / OUT_OF_RANGE, a
    `FileNotFoundError`, a JSON or text decode error). False for transient or access errors (PERMISSION_DENIED,
    UNAVAILABLE, DEADLINE_EXCEEDED, connection errors, timeouts) and for anything else, such as a state whose
    structure or shapes do not match the checkpoint: only evidence of damage sets a checkpoint aside.
    """
    chain, seen = [], set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain)
    if any(isinstance(x, PermissionError | ConnectionError | TimeoutError) for x in chain):
        return False
    if any(f"{code}:" in text for code in _TRANSIENT_CODES):
        return False
    if any(isinstance(x, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError | EOFError) for x in chain):
        return True
    return any(f"{code}:" in text for code in _DAMAGED_CODES)


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


class PreemptionGuard:
    """Turns SIGTERM (a preemption notice) and optionally SIGINT into a flag the loop polls.

    Usage::

      with PreemptionGuard() as guard:
          for step in ...:
              ...
              if guard.should_stop:
                  ckpt.save(step, state, it, config, force=True)
                  ckpt.wait()
                  break

    The previous handlers come back on exit. A second SIGINT raises `KeyboardInterrupt`, so an
    impatient Ctrl-C still stops a hung loop. Must be entered in the main thread.
    """

    def __init__(self, *, sigterm: bool = True, sigint: bool = False):
        self._signals = ((signal.SIGTERM,) if sigterm else ()) + ((signal.SIGINT,) if sigint else ())
        self._previous: dict[int, Any] = {}
        self._received: int | None = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread.")
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signum  # Only set a flag: logging here could deadlock.

    @property
    def should_stop(self) -> bool:
        """Whether a handled signal has arrived."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """E.g. "SIGTERM", once a signal has arrived."""
        return None if self._received is None else signal.Signals(self._received).name
