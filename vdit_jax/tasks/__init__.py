"""What can be trained: one `Task` per network kind, looked up by `config.model.kind`.

The trainer (`vdit_jax.train`), the sampler (`inference.sample`) and the dry run never ask which network they run
; they ask the task of the config for

  - `default_model()`: the fields of `config.model` for its network (`config.base_config(kind)` declares them);
  - `batch_shapes(batch_size)`: the batch fields it needs (names of DESIGN.md §4) with shapes and dtypes;
  - `init(rng, batch)`: the network's (logically annotated) parameters for a batch spec;
  - `prepare_batch(batch, rng)`: the per-example random draws of a step (diffusion timesteps, noise, condition
    dropout, ...), made once for the whole global batch so an accumulated step equals the full-batch one;
  - `loss(params, batch, rng) -> (loss, metrics)`: the pure objective, built from `vdit_jax.diffusion`;
  - `sample(params, cond, rng, ...)`: its sampling function, and `sample_conditions(...)` for training-time
    samples;
  - `validate(config)`, `validate_mesh(config, mesh_sizes)`: the checks of its own config values;
  - for the benchmark (`vdit_jax.bench`): `denoise_model_fn(params, batch)` (one sampling step's network call),
    `forward_flops(batch_size)` (analytic model FLOPs, or None: then only XLA's count is reported) and
    `tokens_per_example()` (or None).

EMA, gradient accumulation, non-finite skipping, checkpoints, metrics and the jitted sharded step are written once,
in `vdit_jax.train`, for every task.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

Batch = dict[str, jax.Array]


class Task(abc.ABC):
    """A trainable network and its objective, bound to a config. Subclasses set `kind` and are registered with
    `@register`."""

    kind: ClassVar[str]
    # Whether `sample` takes prompts (class labels / texts: the sample CLI's --prompt, --label); a task without them
    # samples its own `sample_conditions` (the interpolator: keyframes of test clips).
    takes_prompts: ClassVar[bool] = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @classmethod
    @abc.abstractmethod
    def default_model(cls) -> ml_collections.ConfigDict:
        """`config.model`'s fields for this kind with their defaults (`config.base_config(kind)`; without "kind")."""

    @abc.abstractmethod
    def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The fields of a batch of `batch_size` examples this task reads."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: dict[str, jax.ShapeDtypeStruct]) -> Any:
        """Boxed (logically partitioned) parameters for batches shaped like `batch` (a micro-batch spec)."""

    def prepare_batch(self, batch: Batch, rng: jax.Array) -> Batch:
        """The batch with this step's per-example random draws added (default: unchanged)."""
        del rng
        return batch

    @abc.abstractmethod
    def loss(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean loss [], metrics {name: mean []}) of a (micro-)batch from `prepare_batch`; pure and jit-able."""

    @abc.abstractmethod
    def sample(self, params: Any, cond: dict[str, Any], rng: jax.Array, **options) -> np.ndarray:
        """Generates one output per condition row (see the task's docstring for `cond` and `options`)."""

    def sampler_options(self, sampler=None, steps=None, eta=None, guidance=None, clip_x0=None) -> tuple:
        """(sampler, steps, eta, guidance, clip_x0) with each None taken from `config.sample`. Raises ValueError for
        a sampler that is not one of `config.SAMPLERS`."""
        from vdit_jax import config as config_lib  # config imports this module

        s = self.config.sample
        sampler = s.sampler if sampler is None else sampler
        if sampler not in config_lib.SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {list(config_lib.SAMPLERS)}")
        return (
            sampler,
            s.steps if steps is None else steps,
            s.eta if eta is None else eta,
            s.guidance if guidance is None else guidance,
            s.clip_x0 if clip_x0 is None else clip_x0,
        )

    @abc.abstractmethod
    def sample_conditions(self, data_dir, num: int, seed: int) -> dict[str, Any]:
        """`num` conditions for training-time samples: `sample`'s `cond` plus "captions" (list of str)."""

    def denoise_model_fn(self, params: Any, batch: Batch, cache_text: bool = True) -> tuple[Any, int]:
        """(model_fn(x_t, t), examples per call) of one sampling step on `batch` (e.g. with classifier-free guidance:
        the doubled batch), for the benchmark's sample mode; `cache_text=False`: without the per-loop text cache
        (text models), for comparison."""
        raise NotImplementedError(f"the {self.kind!r} task has no sampling step to benchmark")

    def forward_flops(self, batch_size: int, text_cached: bool = False) -> dict[str, float] | None:
        """Analytic FLOPs of one forward on `batch_size` examples ({"total": ..., parts...}), or None;
        `text_cached`: as a sampling step runs it, with what depends on the text alone computed once per loop."""
        del batch_size, text_cached
        return None

    def tokens_per_example(self) -> int | None:
        """Tokens the network sees per example (transformers), or None."""
        return None

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """Raises `config.ConfigError` for a value of this task's that cannot work (default: none)."""
        del config

    @classmethod
    def validate_mesh(cls, config: ml_collections.ConfigDict, mesh_sizes: dict[str, int]) -> None:
        """Raises `config.ConfigError` where this task's values do not suit the mesh (default: none)."""
        del config, mesh_sizes


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: makes `cls` the task of `config.model.kind == cls.kind`."""
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"two tasks of kind {cls.kind!r}: {_REGISTRY[cls.kind].__name__} and {cls.__name__}")
    _REGISTRY[cls.kind] = cls
    return cls


def kinds() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def task_class(kind: str) -> type[Task]:
    """The registered task class of `kind`; raises ValueError naming the kinds there are."""
    _load_builtin()
    if kind not in _REGISTRY:
        raise ValueError(f"model kind {kind!r} is not one of {list(kinds())}")
    return _REGISTRY[kind]


def get(config: ml_collections.ConfigDict) -> Task:
    """The task of `config.model.kind`, bound to `config`."""
    return task_class(config.model.kind)(config)


def _load_builtin() -> None:
    # The built-in tasks register themselves on import (imported here, late: they import the config module,
    # which looks tasks up).
    from vdit_jax.tasks import autoencoder, dit, interpolator  # noqa: F401
