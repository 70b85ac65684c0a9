"""Sampling videos from a trained model: usable from a notebook, the sample CLI and the trainer.

The whole denoising loop (with classifier-free guidance) is one jitted function from `vdit_jax.diffusion`;
the network is passed as `Partial(apply, params)`, so sampling again with new parameters reuses the compiled loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vdit_jax import config as config_lib
from vdit_jax import paths, tasks
from vdit_jax.models import lora
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib


def sample(
    config: ml_collections.ConfigDict,
    params,
    labels: np.ndarray | None,
    rng: jax.Array,
    *,
    text: np.ndarray | None = None,
    text_mask: np.ndarray | None = None,
    prompts: Sequence[str] | None = None,
    given_frames: np.ndarray | None = None,
    frame_mask: np.ndarray | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    guidance: float | None = None,
    clip_x0: float | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Generates N videos with the config's task (`config.model.kind`): one per label, or per text for text models.

    Args:
      labels: int [N] in [0, num_classes) for class-conditional models (num_classes is the null class); for other
        models only their number counts (None is fine for text models).
      text, text_mask: text models (`model.text_dim > 0`) need text float [N, L, text_dim] precomputed embeddings and
        take text_mask bool [N, L] (True = a real token; None = all real). The unconditional branch of
        classifier-free guidance is `dit.null_text` (one real zero token), as in training. Models with the
        built-in text encoder (`model.text_vocab`) take int32 tokens [N, L] as `text` (None mask = the non-padding),
        or `prompts` instead; their null is the empty prompt's tokens.
      prompts: N free-text prompts for a built-in-text model, tokenized with its vocabulary at `data.text_len`
        (`data.sources.encode_prompts`: an unknown word or a prompt too long is a ValueError naming both).
      given_frames, frame_mask: frame-conditioned models (`model.frame_conditioning`): clean frames float
        [N, T, H, W, C] in the model's space ([-1, 1] pixels) and bool [N, T], True where a frame is given (None =
        nothing given). The output holds the given frames exactly (for uint8 pixels mapped to [-1, 1]: bit for bit)
        and the model generates the others: image-to-video (the first frame), continuation (the first k),
        interpolation (the first and the last).
      sampler, steps, eta, guidance, clip_x0: default to `config.sample`.
      batch_size: videos per jitted sampling call.

    Returns:
      RGB models (`model.in_channels == 3`): uint8 [N, T, H, W, 3] pixels. Latent models (any other channel count):
      the raw float32 [N, T, H, W, C] latents (not clipped, not converted), for a decoder or `samples.npz`.

    Raises:
      ValueError: a sampler that does not exist, or conditions that do not fit the model (named in the message).
    """
    builtin = bool(config.model.get("text_vocab"))
    if prompts is not None:
        if not builtin:
            raise ValueError(
                "free-text prompts are for models with the built-in text encoder (model.text_vocab); this model takes "
                + ("precomputed text embeddings (text, text_mask)" if config.model.get("text_dim") else "no text")
            )
        if text is not None:
            raise ValueError("give prompts or text (tokens), not both")
        from vdit_jax.data import sources

        text, text_mask = sources.encode_prompts(config, prompts)
    cond = {"label": labels, "tokens" if builtin else "text": text, "text_mask": text_mask}
    if given_frames is not None or frame_mask is not None:
        cond.update(given_frames=given_frames, frame_mask=frame_mask)
    options = dict(sampler=sampler, steps=steps, eta=eta, guidance=guidance, clip_x0=clip_x0)
    task = tasks.get(config)
    return task.sample(params, cond, rng, **options, batch_size=batch_size, progress=progress)


def gather_params(params):
    """Parameters as host NumPy arrays (gathered from every process when they are sharded across hosts)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def load(workdir, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, EMA params, step) of the latest (or a given) checkpoint of a training workdir, on one device.

    `workdir` is any `etils.epath` path (a local directory or `gs://bucket/run`). A LoRA run's workdir
    (`config.lora.rank > 0`) gives its base's parameters (the step it was trained on) with its EMA adapter merged
    (`apply_adapters`).

    Raises:
      FileNotFoundError: the workdir (or a LoRA run's base) has no checkpoints or no config.json.
      ValueError: a LoRA run whose base no longer matches the adapter (the mismatch named).
    """
    workdir = paths.resolve(workdir)
    _checkpoint_dir(workdir)  # the first thing a user gets wrong: a path that is not a run
    config = load_config(workdir)
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    params, restored_step = restore_ema(workdir, config, mesh, rules, step)
    if config.lora.rank:
        adapter = Adapter(config, params, _lora_metadata(workdir, restored_step), workdir)
        base_config, base, _ = load(adapter.metadata["base_workdir"], adapter.metadata["base_step"])
        params = apply_adapters(base_config, base, [(adapter, 1.0)])
    return config, params, restored_step


def restore_ema(workdir, config: ml_collections.ConfigDict, mesh, rules, step: int | None = None) -> tuple[dict, int]:
    """(EMA params, step) of a run's latest (or a given) checkpoint, restored onto `mesh`'s shardings of `config`
    (a LoRA run: its adapter). Only the EMA is read: the raw parameters and the optimizer state (3x the EMA's size)
    stay on disk, and the optimizer state's saved structure does not matter. Raises FileNotFoundError."""
    ckpt_dir = _checkpoint_dir(workdir)
    target = {"ema_params": state_lib.abstract_state(config, mesh, rules).ema_params}
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
        restored_step, restored = checkpointer.restore(target, step=step, partial=True)
    finally:
        checkpointer.close()
    return restored["ema_params"], int(restored_step)


def _checkpoint_dir(workdir):
    """workdir/checkpoints; FileNotFoundError naming the workdir when it is missing."""
    ckpt_dir = paths.resolve(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints under {os.fspath(workdir)!r} (expected {os.fspath(ckpt_dir)})")
    return ckpt_dir


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA run's EMA adapter (`models.lora`'s layout) with its config and metadata (`train.finetune`)."""

    config: ml_collections.ConfigDict
    params: dict
    metadata: dict
    workdir: Any

    @property
    def lora(self) -> lora.LoraConfig:
        return config_lib.lora_config(self.config)


def load_adapter(workdir, step: int | None = None) -> Adapter:
    """The adapter of a LoRA run's latest (or a given) checkpoint, on one device, unmerged.

    Raises:
      FileNotFoundError: no checkpoints, config.json or adapter metadata.
      ValueError: the workdir is not a LoRA run.
    """
    workdir = paths.resolve(workdir)
    config = load_config(workdir)
    if not config.lora.rank:
        raise ValueError(f"{os.fspath(workdir)!r} is not a LoRA run (its config.lora.rank is 0)")
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    params, restored_step = restore_ema(workdir, config, mesh, sh.rules_from_config(config.logical_axis_rules), step)
    return Adapter(config, params, _lora_metadata(workdir, restored_step), workdir)


def _lora_metadata(workdir, step: int) -> dict:
    return ckpt_lib.restore_json(paths.resolve(workdir) / "checkpoints", ckpt_lib.LORA, step)


def apply_adapters(base_config: ml_collections.ConfigDict, base_params, adapters: Sequence[tuple[Adapter, float]]):
    """`base_params` with every (adapter, scale) merged in (`lora.merge`: W + sum scale * alpha / r * A @ B), after
    checking that each adapter was made for this base: the same model config, kernel paths and shapes, rank and
    targets (its metadata). Raises ValueError naming the first mismatch; nothing is merged then."""
    base_model = ckpt_lib.config_to_json_dict(base_config.model)
    for adapter, _ in adapters:
        name = os.fspath(adapter.workdir)
        made_for = adapter.metadata["base_model"]
        for key in sorted(set(made_for) | set(base_model)):
            if made_for.get(key) != base_model.get(key):
                raise ValueError(
                    f"the adapter {name!r} was made for a base with model.{key}={made_for.get(key)!r}; this base has "
                    f"model.{key}={base_model.get(key)!r}"
                )
        try:
            lora.check_compatible(adapter.metadata["adapter"], adapter.lora, base_params)
        except ValueError as e:
            raise ValueError(f"the adapter {name!r} does not fit this base: {e}") from None
    return lora.merge(base_params, [(a.lora, a.params, float(scale)) for a, scale in adapters])


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config of a training workdir (its config.json, on the base config). Raises FileNotFoundError."""
    config_path = paths.resolve(workdir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {os.fspath(workdir)!r}: is it a vdit_jax training workdir?")
    return config_from_json(ml_collections.ConfigDict(json.loads(config_path.read_text())))


def config_from_json(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config read back from JSON, on top of the base config so tuples and new keys are right."""
    base = config_lib.base_config(config.model.get("kind", "dit"))
    base.update_from_flattened_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in _flatten(config.to_dict()).items()}
    )
    base.logical_axis_rules = sh.rules_from_config(config.logical_axis_rules)
    return base


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k == "logical_axis_rules":
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
