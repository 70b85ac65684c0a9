"""The training loop: data, sharded state, the jitted step, metrics, checkpoints, preemption and samples.

`train(config, workdir)` is what `python -m vdit_jax.train` runs; it is importable from a notebook too. `workdir`
is any `etils.epath` path: a local directory or `gs://bucket/run` (the dataset is still built on a local disk).

How a run ends:
  done          `num_steps` reached: a final checkpoint, samples (if configured), `last_metrics.json`.
  preempted     SIGTERM (one process), or JAX's multi-host preemption sync point (several processes: every process
                stops at the same step): a checkpoint of that step, then a clean return (`stopped` names it).
  an error      the non-finite limit, a data error, Ctrl-C, or any exception: the checkpoint in flight is finished
                (or left cleanly absent), the writers are closed, and `RunStopped` is raised with one line naming
                the cause, the step and the last good checkpoint. A first Ctrl-C (one process) stops after the step
                and checkpoints it first; a second one interrupts at once.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from vdit_jax import config as config_lib
from vdit_jax import inference, paths, tasks, video_io
from vdit_jax.data import latents, sources
from vdit_jax.models import lora
from vdit_jax.parallel import distributed
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import finetune
from vdit_jax.train import metrics as metrics_lib
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class DataError(RuntimeError):
    """Reading the training data failed (beyond the bad records the pipeline skips)."""


class RunStopped(RuntimeError):
    """The run stopped before `num_steps` on an error. The message is one line: the cause, the step and the last
    good checkpoint; the original exception is the `__cause__`.

    Attributes:
      exit_code: what a CLI should exit with (1; 130 for Ctrl-C).
      unexpected: True when the cause is not a known way for a run to stop (a bug): show its traceback.
    """

    def __init__(self, message: str, *, exit_code: int = 1, unexpected: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.unexpected = unexpected


def _global_batch(local: dict, mesh, rules, shapes: dict) -> dict:
    """This process's rows of the global batch -> global jax.Arrays sharded over the data axes.

    Carries every field of `shapes` (the model's batch spec: video, label, and text / text_mask for text models);
    a dataset without labels gets label 0 (an unconditional model ignores it).
    """
    out = {}
    for key, spec in shapes.items():
        if key == "label" and key not in local:
            value = np.zeros((len(local["video"]),), np.int32)
        elif key not in local:
            raise DataError(f"the data has no field {key!r} that the model needs; it has {sorted(local)}")
        else:
            value = np.asarray(local[key], spec.dtype)
        out[key] = jax.make_array_from_process_local_data(sh.batch_sharding(mesh, rules, value.ndim), value)
    return out


def write_samples(config, params, step: int, workdir, data_dir) -> str:
    """EMA samples of the current state to `workdir/samples/step_N/` (mp4 + gif + samples.npz; latents: npz only).

    Runs on this process's first local device (params are host arrays): call it on one process only.
    """
    task = tasks.get(config)
    cond = task.sample_conditions(data_dir, config.train.sample_num, seed=config.seed + 1)
    captions = cond.pop("captions")
    videos = task.sample(params, cond, jax.random.key(config.seed + 1))
    out_dir = paths.resolve(workdir) / "samples" / f"step_{step}"
    return video_io.save_samples(out_dir, videos, captions, fps=config.sample.fps)


def _sample_on_process_0(config, state, step: int, workdir, data_dir, rules, base=None) -> str | None:
    """Training-time samples: every process gathers the EMA parameters (a collective when they are sharded over
    hosts), then process 0 alone samples on its own first device, outside the global mesh (a program over the
    global mesh would need every process). The others go on to the next step and wait for it there. A failure
    is logged with its traceback and training goes on. A LoRA run samples its `base` with the EMA adapter merged."""
    ema = inference.gather_params(state.ema_params)
    if base is not None:
        ema = lora.merge(inference.gather_params(base), [(config_lib.lora_config(config), ema, 1.0)])
    if jax.process_index() != 0:
        return None
    local_mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.local_devices()[:1])
    try:
        with step_lib.logical_context(local_mesh, rules):
            return write_samples(config, ema, step, workdir, data_dir)
    except Exception:  # samples are a by-product: a failure to make or write them never ends a training run
        logging.exception("writing the samples of step %d failed; training goes on", step)
        return None


def _write_json(path, obj) -> None:
    paths.write_bytes_atomic(path, json.dumps(obj, indent=2).encode())


def train(config: ml_collections.ConfigDict, workdir, *, data_dir=None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics (`stopped`: None, or the signal
    / "preemption" that ended it early).

    Raises:
      config.ConfigError: a bad config value (before anything is built).
      RunStopped: the run stopped on an error; the message names the cause and the last good checkpoint.
    """
    # ---------------------------------------------------------------- set-up and validation
    config_lib.validate(config, jax.device_count(), jax.process_count())
    data_dir = data_dir or config.data.data_dir or sources.default_data_dir()
    if latents.is_latent_dataset(config.data.name):  # the decoding metadata goes into the run's config
        try:
            latents.fill_config(config, data_dir)
        except (ValueError, FileNotFoundError) as e:
            raise config_lib.ConfigError(f"config.data.name={config.data.name!r}: {e}") from None
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        paths.write_bytes_atomic(workdir / "config.json", config.to_json_best_effort(indent=2).encode())
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict())
    rules = sh.rules_from_config(config.logical_axis_rules)
    logging.info("mesh %s, %d process(es), workdir %s", dict(mesh.shape), jax.process_count(), workdir)
    base = lora_meta = None
    if config.lora.rank:  # a LoRA run: the frozen base, read straight onto the mesh (`train.finetune`)
        base, lora_meta = finetune.base_params(config, mesh, rules, workdir)
        logging.info("LoRA on %s (step %d)", lora_meta["base_workdir"], lora_meta["base_step"])

    # ---------------------------------------------------------------- data
    dataset = sources.make_train_dataset(config, data_dir)
    data_iter = iter(dataset)

    tc = config.train
    ckpt = ckpt_lib.Checkpointer(
        workdir / "checkpoints", max_to_keep=tc.keep_checkpoints, save_interval_steps=tc.checkpoint_every
    )
    writer = loop = None
    step = 0
    try:
        # ------------------------------------------------------------ state: fresh or resumed
        if ckpt.latest_step() is not None:
            start, state = ckpt.restore(state_lib.abstract_state(config, mesh, rules), data_iterator=data_iter)
            logging.info("resumed from step %d", start)
        else:
            start = 0
            state = state_lib.create_train_state(config, mesh, rules, jax.random.key(config.seed))
        step = start
        if base is None:
            logging.info("parameters: %s", f"{state_lib.count_params(state.params):,}")
        else:
            n, n_base = state_lib.count_params(state.params), state_lib.count_params(base)
            logging.info("adapter parameters: %s (%.2f%% of the base's %s)", f"{n:,}", 100 * n / n_base, f"{n_base:,}")
        writer = metrics_lib.MetricsWriter(workdir, purge_step=start + 1 if start else None)

        # ------------------------------------------------------------ the loop
        loop = _Loop(config, mesh, rules, ckpt, writer, data_iter, workdir, data_dir, base, lora_meta)
        state, last, stopped = loop.run(state, start)
        step = loop.step

        # ------------------------------------------------------------ the end (or a preemption)
        ckpt.save(step, state, data_iter, config, force=True, lora_metadata=lora_meta)
        ckpt.wait()
        if stopped == "SIGINT":  # Ctrl-C: the checkpoint of this step is saved; the run still ends as an error
            raise KeyboardInterrupt
        if stopped:
            logging.warning("%s: saved a checkpoint at step %d and stopped", stopped, step)
        elif tc.sample_num:
            path = _sample_on_process_0(config, state, step, workdir, data_dir, rules, base)
            if path:
                logging.info("samples of step %d in %s", step, path)
    except BaseException as e:
        if loop is not None:
            step = loop.step
        raise _stopped(e, step, ckpt) from e
    finally:
        if writer is not None:
            writer.close()
        with contextlib.suppress(Exception):  # already reported by _stopped when it failed
            ckpt.close()
    last["step"] = step
    last["stopped"] = stopped
    if jax.process_index() == 0:
        _write_json(workdir / "last_metrics.json", last)
    return last


def _stopped(error: BaseException, step: int, ckpt: ckpt_lib.Checkpointer) -> BaseException:
    """Finishes the checkpoint in flight and turns `error` into one `RunStopped` line (peer failures and config
    errors pass through unchanged: the CLI has its own line for them)."""
    if isinstance(error, config_lib.ConfigError | ckpt_lib.CheckpointReadError | RunStopped):
        return error
    if distributed.is_peer_failure(error):
        return error  # another process is gone: waiting for a checkpoint barrier would hang
    try:
        ckpt.wait()  # the in-flight save completes (orbax renames it into place) or raises
        save_note = ""
    except BaseException as e:  # noqa: BLE001 - reported in the one line
        save_note = f" (the checkpoint being written failed: {type(e).__name__}: {ckpt_lib._short(e, 120)})"
    latest = ckpt.latest_step()
    where = f"step {latest} in {ckpt.directory}" if latest is not None else f"none yet in {ckpt.directory}"
    if isinstance(error, KeyboardInterrupt):
        cause, code, unexpected = "interrupted (Ctrl-C)", 130, False
    elif isinstance(error, NonFiniteError | DataError):
        cause, code, unexpected = str(error), 1, False
    else:
        cause, code, unexpected = f"{type(error).__name__}: {ckpt_lib._short(error)}", 1, True
    return RunStopped(
        f"training stopped at step {step}: {cause}{save_note}; last good checkpoint: {where}. Run the same command "
        "to resume from it.",
        exit_code=code,
        unexpected=unexpected,
    )


class _Loop:
    """The step loop: one jitted step a batch, with the bookkeeping around it.

    Non-finite updates: the step skips them and counts the streak in the state; the loop reads the previous
    step's streak right after dispatching the next step (a scalar that is ready by then), so every streak is seen
    without a blocking read per step. (`optax.apply_if_finite` would guard only the optimizer update; this step
    also keeps the EMA and counts a non-finite loss, and its counters are checkpointed with the state.)
    """

    def __init__(self, config, mesh, rules, ckpt, writer, data_iter, workdir, data_dir, base=None, lora_meta=None):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.ckpt, self.writer, self.data_iter = ckpt, writer, data_iter
        self.workdir, self.data_dir = workdir, data_dir
        self.base, self.lora_meta = base, lora_meta  # a LoRA run's frozen base and adapter metadata, else None
        self.shapes = step_lib.batch_shapes(config)
        self.lr = state_lib.learning_rate_schedule(config.train)
        self.train_step = step_lib.make_train_step(config, mesh, rules, base)
        self.step = 0  # the last step dispatched

    def _next_batch(self) -> dict:
        try:
            local = next(self.data_iter)
        except StopIteration:
            raise DataError("the training data ended (a finite dataset); training repeats it forever") from None
        except Exception as e:
            raise DataError(f"reading the training data failed: {type(e).__name__}: {ckpt_lib._short(e)}") from e
        return _global_batch(local, self.mesh, self.rules, self.shapes)

    def _check_streak(self, metrics, step: int) -> None:
        tc = self.config.train
        streak = int(jax.device_get(metrics["nonfinite_streak"]))
        if streak >= tc.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{streak} updates in a row had a non-finite loss or gradient (limit "
                f"config.train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite}) up to step {step}; lower "
                "the learning rate or check the data"
            )

    def run(self, state, start: int):
        config, tc = self.config, self.config.train
        multi = jax.process_count() > 1
        timer = metrics_lib.StepTimer(tc.num_steps)
        last: dict = {}
        stopped, pending = None, None
        self.step = start
        bar = tqdm.tqdm(
            total=tc.num_steps, initial=start, desc="train", dynamic_ncols=True, disable=jax.process_index() != 0
        )
        t_start = time.perf_counter()
        # One process: SIGTERM and a first Ctrl-C set a flag checked after each step (a second Ctrl-C interrupts at
        # once). Several: JAX's preemption service (started by jax.distributed) handles SIGTERM and every process
        # asks it each step, so all of them stop at the same step.
        guard = contextlib.nullcontext() if multi else ckpt_lib.PreemptionGuard(sigint=True)
        try:
            with step_lib.logical_context(self.mesh, self.rules), guard:
                timer.tick(start)
                while self.step < tc.num_steps:
                    # Input overlaps compute: dispatch is asynchronous, so this batch is read (grain's prefetch
                    # threads decode the records ahead), stacked and put on the devices while the previous step
                    # still runs; the streak check below waits for that previous step only, so at most two steps
                    # are in flight. Measured on the CPU demo: the loop runs within ~3 % of the bare step (README).
                    batch = self._next_batch()
                    state, metrics = self.train_step(state, batch)
                    self.step = step = self.step + 1
                    bar.update(1)
                    if pending is not None:  # the previous step's streak, read while this step runs
                        self._check_streak(*pending)
                    pending = (metrics, step)
                    if step % tc.log_every == 0 or step == tc.num_steps:
                        host = jax.device_get(metrics)
                        timer.tick(step)
                        last = {
                            **{k: float(v) for k, v in host.items()},
                            "lr": float(self.lr(step - 1)),
                            "steps_per_s": timer.steps_per_s or 0.0,
                            "elapsed_s": time.perf_counter() - t_start,
                        }
                        self.writer.write(step, last)
                    if self.ckpt.save(step, state, self.data_iter, config, lora_metadata=self.lora_meta):
                        self.writer.flush()  # the log reaches the storage at least as far as the checkpoint
                    if tc.sample_num and tc.sample_every and step % tc.sample_every == 0 and step < tc.num_steps:
                        _sample_on_process_0(config, state, step, self.workdir, self.data_dir, self.rules, self.base)
                    if multi:
                        if self.ckpt.reached_preemption(step):
                            stopped = "preemption"
                            break
                    elif guard.should_stop:
                        stopped = guard.signal_name
                        break
                if pending is not None:
                    self._check_streak(*pending)
        finally:
            bar.close()
        return state, last, stopped
