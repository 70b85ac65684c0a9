"""LoRA fine-tuning runs (`config.lora.rank > 0`): the frozen base a run adapts and the metadata that ties its
adapter to that base.

The trainer reads the base's EMA parameters straight onto the mesh (`base_params`); the train state then holds the
adapter alone (`train.state.TrainState`) and every checkpoint carries `metadata` as its `lora` item, which
`inference.apply_adapters` checks before it merges the adapter into a base for sampling.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from vdit_jax import config as config_lib
from vdit_jax import inference, paths
from vdit_jax.models import lora
from vdit_jax.train import checkpoint as ckpt_lib


def base_params(config: ml_collections.ConfigDict, mesh, rules, workdir=None) -> tuple[Any, dict]:
    """(the base's EMA parameters on `mesh`, the adapter's metadata) of a LoRA run.

    A run resumed from `workdir`'s checkpoints keeps the base step its adapter was trained on (their metadata),
    whatever the base run has written since.

    Raises:
      config.ConfigError: the base is missing, is itself a LoRA run, or its model config differs from
        `config.model` (the first differing key named).
    """
    lo = config.lora
    workdir_of_run, base_dir = workdir, paths.resolve(lo.base_workdir)
    try:
        base_config = inference.load_config(base_dir)
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"config.lora.base_workdir={lo.base_workdir!r}: {e}") from None
    if base_config.lora.rank:
        raise config_lib.ConfigError(
            f"config.lora.base_workdir={lo.base_workdir!r} is itself a LoRA run; adapt the run it adapts (several "
            "adapters combine when sampling: vdit_jax.sample --lora)"
        )
    mine, base = ckpt_lib.config_to_json_dict(config.model), ckpt_lib.config_to_json_dict(base_config.model)
    for key in sorted(set(mine) | set(base)):
        if mine.get(key) != base.get(key):
            raise config_lib.ConfigError(
                f"config.model.{key}={mine.get(key)!r}, but the base run {lo.base_workdir!r} has model.{key}="
                f"{base.get(key)!r}: a LoRA run keeps its base's model config"
            )
    step = None if lo.base_step < 0 else int(lo.base_step)
    saved = _saved_metadata(workdir_of_run)
    if saved is not None:
        step = int(saved["base_step"])
    try:
        params, step = inference.restore_ema(base_dir, base_config, mesh, rules, step)
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"config.lora.base_workdir={lo.base_workdir!r}: {e}") from None
    return params, metadata(config, params, os.fspath(base_dir), step, base)


def _saved_metadata(workdir) -> dict | None:
    """The adapter metadata of a run's newest checkpoint, or None (a fresh run)."""
    if workdir is None:
        return None
    try:
        return ckpt_lib.restore_json(paths.resolve(workdir) / "checkpoints", ckpt_lib.LORA)
    except FileNotFoundError:
        return None


def metadata(config: ml_collections.ConfigDict, base, base_workdir: str, base_step: int, base_model: dict) -> dict:
    """The JSON saved with every checkpoint of a LoRA run: `lora.describe` of its base (rank, alpha, targets, the
    kernels' paths and shapes), the base's workdir and step, and its model config."""
    return {
        "adapter": lora.describe(config_lib.lora_config(config), base),
        "base_workdir": base_workdir,
        "base_step": int(base_step),
        "base_model": base_model,
    }
