"""The base config: every key the trainer, sampler and benchmark read, declared once, plus its validation.

Experiment files under `configs/` start from `base_config()` and override values; nothing else in the code reads a
key with a default. `validate(config, num_devices)` runs before anything compiles and raises `ConfigError` with one
line naming the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping

import jax
import ml_collections

from vdit_jax import diffusion
from vdit_jax.data import moving_shapes
from vdit_jax.diffusion import LOSS_TYPES, PREDICTIONS, SCHEDULES, TIMESTEP_SAMPLINGS
from vdit_jax.models import dit, lora
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh

SAMPLERS = ("ddim", "ddpm")
DDPM_VARIANCES = ("fixed_small", "fixed_large")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def base_config(kind: str = "dit") -> ml_collections.ConfigDict:
    """Every key with its default; `config.model` holds the network of `kind` (a task of `vdit_jax.tasks`:
    "dit", "unet_interpolator", "video_autoencoder"). Raises ConfigError for a kind that is not registered."""
    from vdit_jax import tasks  # late: the tasks import this module

    try:
        task = tasks.task_class(kind)
    except ValueError as e:
        raise ConfigError(f"config.model.kind: {e}") from None
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data: a TFDS array_record dataset with a uint8 video feature [T, H, W, C].
    c.data = ml_collections.ConfigDict()
    c.data.name = "moving_shapes"  # a TFDS builder name; moving_shapes is built on first use
    c.data.builder_config = "16x32"  # moving_shapes: 16x32 / 16x64 / 8x32 / 8x16 / 16x16 / 17x32 / 17x64
    c.data.data_dir = ""  # a LOCAL dir; '' = $VDIT_DATA_DIR or ~/.cache/vdit_jax/data (--data_dir wins)
    c.data.split = "train"
    c.data.feature_key = "video"
    c.data.label_key = "label"  # '' for an unconditional dataset
    c.data.num_classes = 84  # 0 = unconditional
    # Text tokens per example; 0 = no text. Precomputed embeddings: the dataset's `text` [L, text_dim] and
    # `text_mask`; the built-in encoder (model.text_vocab): `tokens` [L] and `text_mask` from the `caption`.
    c.data.text_len = 0
    # Labels whose records the training split leaves out (held-out classes or colour x shape x direction
    # combinations; other splits keep them); needs data.label_key.
    c.data.exclude_labels = ()
    c.data.video_shape = (16, 32, 32, 3)  # (T, H, W, C) as stored
    c.data.num_frames = 0  # temporal crop length; 0 = all frames
    c.data.frame_stride = 1

    # Network: `kind` (what is trained: the trainer, sampler and bench look its task up) and the fields of the
    # task's network (DiT: every field of vdit_jax.models.DiTConfig; unet_interpolator: of UNetConfig).
    c.model = task.default_model()
    c.model.kind = kind

    # Diffusion.
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # linear / scaled_linear / cosine
    c.diffusion.num_timesteps = 1000
    c.diffusion.zero_terminal_snr = False  # rescale to ᾱ_(T-1) = 0 (Lin et al. 2024); needs prediction v or x0
    c.diffusion.prediction = "v"  # eps / v / x0
    c.diffusion.loss = "mse"  # mse / l1 (mean absolute error on the target; on the CPU demo l1 failed: README)
    c.diffusion.min_snr_gamma = 5.0  # 0 = plain MSE on the target
    c.diffusion.min_snr_floor = 0.0  # x0-space weight clip(snr, floor, gamma); 0 = plain min-SNR
    c.diffusion.timestep_sampling = "uniform"  # uniform / logit_normal (t/T = sigmoid(N(mean, std)), SD3)
    c.diffusion.timestep_logit_mean = 0.0  # logit_normal only: > 0 trains noisier steps more, < 0 cleaner ones
    c.diffusion.timestep_logit_std = 1.0
    c.diffusion.label_dropout = 0.1  # probability of the null label / text in training (classifier-free guidance)

    # Frame conditioning (model.frame_conditioning): what an example is given in training, drawn per example at
    # these rates (they sum to 1): nothing (unconditional generation, so CFG keeps working), the first frame
    # (image-to-video), the first k frames with k uniform in [2, max_prefix] (continuation; 0 = max(T // 2, 2);
    # at most T - 1), or the first and the last frame (the keyframe stage's anchors, interpolation).
    c.frames = ml_collections.ConfigDict()
    c.frames.rate_none = 0.1
    c.frames.rate_first = 0.3
    c.frames.rate_prefix = 0.3
    c.frames.rate_first_last = 0.3
    c.frames.max_prefix = 0

    # Optimisation.
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 32
    c.train.grad_accum_steps = 1  # micro-batches per step (global_batch_size is split)
    c.train.num_steps = 1000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100  # linear warm-up; a shorter run (num_steps overridden) warms up for num_steps - 1
    c.train.end_lr_fraction = 0.1  # cosine decay to this fraction of the peak
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.grad_clip = 1.0  # global-norm clipping; 0 = off
    c.train.ema_decay = 0.999  # with warm-up min(decay, (1 + step) / (10 + step))
    c.train.max_consecutive_nonfinite = 10  # skipped updates in a row before the run stops
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0  # 0 = only at the end; writes DIR/samples/step_N/
    c.train.sample_num = 8  # videos written at each sampling point; 0 = none

    # Sampling (training-time samples and the defaults of `python -m vdit_jax.sample`).
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"  # ddim / ddpm
    c.sample.steps = 50
    c.sample.eta = 0.0
    c.sample.guidance = 3.0  # 1.0 = plain conditional
    c.sample.clip_x0 = 1.0  # 0 = no clipping
    c.sample.ddpm_variance = "fixed_small"  # fixed_small / fixed_large
    c.sample.fps = 8

    # Latent diffusion: the video autoencoder whose latents the dataset holds (`vdit_jax.data.latents`), its step and
    # the per-channel mean / std the latents were normalised with. Filled by the trainer from a `video_latents/...`
    # dataset's metadata; sampling decodes with them, so a latent run writes pixels like a pixel run.
    c.latent = ml_collections.ConfigDict()
    c.latent.autoencoder = ""  # a training workdir of kind video_autoencoder; '' = the data are pixels
    c.latent.autoencoder_step = -1
    c.latent.mean = ()
    c.latent.std = ()
    c.latent.source = ""  # the dataset the latents were encoded from, e.g. moving_shapes/17x32 (its prompts apply)

    # LoRA fine-tuning (vdit_jax.models.lora; rank 0 = off, the whole network is trained): the run trains low-rank
    # adapters on the kernels `targets` names (presets of lora.PRESETS or regexes on "/"-joined parameter paths) of
    # the frozen EMA parameters of the run in `base_workdir` (its latest checkpoint, or `base_step`). The model
    # config must equal the base's. Checkpoints then hold the adapter alone (its train state) and the metadata
    # that ties it to the base; sampling the run merges it into the base.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.targets = ("attn",)
    c.lora.base_workdir = ""  # a training workdir (local or gs://)
    c.lora.base_step = -1  # -1 = the base's latest checkpoint

    # Parallelism: mesh axes data, fsdp, tensor, sequence (-1 = the rest of the devices) and logical rules.
    c.mesh_shape = ml_collections.ConfigDict({sh.DATA: -1, sh.FSDP: 1, sh.TENSOR: 1, sh.SEQUENCE: 1})
    c.logical_axis_rules = sh.default_rules()
    return c


def _check_lora_targets(config: ml_collections.ConfigDict, task) -> None:
    """config.lora.targets match some kernel of the network (shapes only: `jax.eval_shape` of its init)."""
    t = task(config)
    shapes = jax.eval_shape(t.init, jax.random.key(0), t.batch_shapes(1))
    try:
        lora.target_paths(lora_config(config), shapes)
    except ValueError as e:
        raise ConfigError(f"config.lora.targets={tuple(config.lora.targets)}: {e}") from None


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig | None:
    """The `models.lora.LoraConfig` of `config.lora`, or None when LoRA is off (rank 0). Raises ValueError for a
    bad alpha or target."""
    lo = config.lora
    if not lo.rank:
        return None
    return lora.LoraConfig(rank=int(lo.rank), alpha=float(lo.alpha), targets=tuple(lo.targets))


def default_dit_model() -> ml_collections.ConfigDict:
    """`config.model` of kind "dit": every field of `DiTConfig` (the tiny size, 4x4 patches)."""
    m = ml_collections.ConfigDict(dataclasses.asdict(dit.dit_config("tiny")))
    m.patch_size = (1, 4, 4)
    m.windows = ((4, 8, 8), (2, 4, 4))
    m.out_channels = ml_collections.config_dict.placeholder(int)  # None (= in_channels), typed for overrides
    return m


def model_config(config: ml_collections.ConfigDict) -> dit.DiTConfig:
    """The frozen DiTConfig of a config of kind "dit" (tuples restored from lists)."""
    m = config.model.to_dict()
    m.pop("kind")
    m["patch_size"] = tuple(m["patch_size"])
    m["windows"] = tuple(tuple(w) for w in m["windows"])
    m["label_factors"] = tuple(m["label_factors"])
    m["text_vocab"] = tuple(m["text_vocab"])
    return dit.DiTConfig(**m)


def diffusion_config(config: ml_collections.ConfigDict) -> diffusion.DiffusionConfig:
    """The frozen `DiffusionConfig` of `config.diffusion`."""
    d = config.diffusion.to_dict()
    d["cond_dropout"] = d.pop("label_dropout")
    return diffusion.DiffusionConfig(**d)


def schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    """The diffusion schedule of a config (`config.diffusion`); raises ValueError for one that cannot work."""
    return diffusion_config(config).make_schedule()


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(T', H, W, C) of a training example: `data.num_frames` frames taken every `data.frame_stride` frames
    (num_frames 0: as many as the stride allows, ceil(T / stride)), as the input pipeline cuts them."""
    t, h, w, ch = config.data.video_shape
    return (config.data.num_frames or (t - 1) // config.data.frame_stride + 1, h, w, ch)


def check(ok: bool, msg: str):
    """Raises ConfigError(msg) unless ok."""
    if not ok:
        raise ConfigError(msg)


def _one_of(config, key: str, allowed):
    value = config
    for part in key.split("."):
        value = value[part]
    check(value in allowed, f"config.{key}={value!r} is not allowed; use one of {list(allowed)}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_seq(v, item=lambda _: True) -> bool:
    return isinstance(v, list | tuple) and all(item(x) for x in v)


def _is_rule(rule) -> bool:
    if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
        return False
    axes = rule[1]
    return axes is None or isinstance(axes, str) or _is_seq(axes, lambda a: isinstance(a, str))


# What a leaf may hold where its base value does not say (tuples, None); every other leaf takes its base value's
# type (an int for a float is fine).
_LEAF_TYPES = {
    "data.video_shape": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "model.patch_size": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "model.label_factors": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "model.windows": (
        "a tuple of (t, h, w) int triples",
        lambda v: _is_seq(v, lambda w: _is_seq(w, _is_int) and len(w) == 3),
    ),
    "model.out_channels": ("None or an int", lambda v: v is None or _is_int(v)),
    "model.channel_mults": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "model.attention_levels": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "data.exclude_labels": ("a tuple of ints", lambda v: _is_seq(v, _is_int)),
    "model.text_vocab": ("a tuple of words", lambda v: _is_seq(v, lambda w: isinstance(w, str))),
    "latent.mean": ("a tuple of numbers", lambda v: _is_seq(v, _is_number)),
    "latent.std": ("a tuple of numbers", lambda v: _is_seq(v, _is_number)),
    "lora.targets": ("a tuple of preset names or regexes", lambda v: _is_seq(v, lambda w: isinstance(w, str))),
    "logical_axis_rules": ("a tuple of (logical_name, mesh_axes) pairs", lambda v: _is_seq(v, _is_rule)),
}
_BASE_TYPES = {
    bool: ("a bool", lambda v: isinstance(v, bool)),
    int: ("an int", _is_int),
    float: ("a finite number", _is_number),
    str: ("a str", lambda v: isinstance(v, str)),
}


def _check_keys_and_types(config, base, prefix: str = ""):
    """Every key of `base` is in `config` with a value of the right type, and `config` has no other key."""
    for key in config.keys():
        if key not in base:
            close = difflib.get_close_matches(key, list(base.keys()), n=1)
            hint = f"; did you mean config.{prefix}{close[0]}?" if close else ""
            raise ConfigError(f"config.{prefix}{key} is not a config key (see vdit_jax.config.base_config){hint}")
    for key, default in base.items():
        path = f"{prefix}{key}"
        check(key in config, f"config.{path} is missing (every key of vdit_jax.config.base_config must be set)")
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            check(
                isinstance(value, ml_collections.ConfigDict | Mapping), f"config.{path}={value!r} must be a ConfigDict"
            )
            if path == "mesh_shape":  # axes may be left out (size 1); unknown ones are refused by the mesh check
                for axis, size in value.items():
                    check(_is_int(size), f"config.mesh_shape.{axis}={size!r} must be an int")
            else:
                _check_keys_and_types(value, default, f"{path}.")
            continue
        what, ok = _LEAF_TYPES.get(path) or _BASE_TYPES[type(default)]
        check(ok(value), f"config.{path}={value!r} must be {what}")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1):
    """Checks every value that could otherwise fail deep inside XLA or halfway through a run.

    First every key and the type of its value (against `base_config()`), then each value's range; the first bad
    value raises `ConfigError` naming the key, the value and what is allowed.
    """
    from vdit_jax import tasks  # late: the tasks import this module

    kind = config.get("model", {}).get("kind", "dit")
    check(isinstance(kind, str), f"config.model.kind={kind!r} must be a str")
    try:
        task = tasks.task_class(kind)
    except ValueError as e:
        raise ConfigError(f"config.model.kind: {e}") from None
    _check_keys_and_types(config, base_config(kind))
    _one_of(config, "diffusion.schedule", SCHEDULES)
    _one_of(config, "diffusion.prediction", PREDICTIONS)
    _one_of(config, "diffusion.timestep_sampling", TIMESTEP_SAMPLINGS)
    _one_of(config, "diffusion.loss", LOSS_TYPES)
    _one_of(config, "sample.sampler", SAMPLERS)
    _one_of(config, "sample.ddpm_variance", DDPM_VARIANCES)
    d, tr, s = config.diffusion, config.train, config.sample
    check(d.num_timesteps >= 2, f"config.diffusion.num_timesteps={d.num_timesteps} must be >= 2")
    try:
        schedule(config)
    except ValueError as e:
        raise ConfigError(f"config.diffusion: {e}") from None
    check(d.min_snr_gamma >= 0, f"config.diffusion.min_snr_gamma={d.min_snr_gamma} must be >= 0 (0 = off)")
    check(
        0 <= d.min_snr_floor <= max(d.min_snr_gamma, 0),
        f"config.diffusion.min_snr_floor={d.min_snr_floor} must be in [0, min_snr_gamma={d.min_snr_gamma}]",
    )
    check(d.timestep_logit_std > 0, f"config.diffusion.timestep_logit_std={d.timestep_logit_std} must be > 0")
    check(0 <= d.label_dropout < 1, f"config.diffusion.label_dropout={d.label_dropout} must be in [0, 1)")
    check(1 <= s.steps <= d.num_timesteps, f"config.sample.steps={s.steps} must be in [1, {d.num_timesteps}]")
    check(s.eta >= 0, f"config.sample.eta={s.eta} must be >= 0")
    check(s.guidance >= 0, f"config.sample.guidance={s.guidance} must be >= 0")
    check(s.clip_x0 >= 0, f"config.sample.clip_x0={s.clip_x0} must be >= 0 (0 = no clipping)")
    check(s.fps >= 1, f"config.sample.fps={s.fps} must be >= 1")
    check(0 <= config.seed < 2**32, f"config.seed={config.seed} must be in [0, 2**32)")
    for key in ("sample_num", "sample_every", "weight_decay", "grad_clip"):
        check(tr[key] >= 0, f"config.train.{key}={tr[key]} must be >= 0")
    for key in ("end_lr_fraction",):
        check(0 <= tr[key] <= 1, f"config.train.{key}={tr[key]} must be in [0, 1]")
    for key in ("b1", "b2"):
        check(0 <= tr[key] < 1, f"config.train.{key}={tr[key]} must be in [0, 1)")
    for key in (
        "num_steps",
        "global_batch_size",
        "grad_accum_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_consecutive_nonfinite",
    ):
        check(tr[key] >= 1, f"config.train.{key}={tr[key]} must be >= 1")
    check(tr.learning_rate > 0, f"config.train.learning_rate={tr.learning_rate} must be > 0")
    check(0 <= tr.ema_decay < 1, f"config.train.ema_decay={tr.ema_decay} must be in [0, 1)")
    check(tr.warmup_steps >= 0, f"config.train.warmup_steps={tr.warmup_steps} must be >= 0")

    # The data.
    da = config.data
    for key in ("name", "split", "feature_key"):
        check(da[key] != "", f"config.data.{key}='' must be a non-empty str")
    check(da.num_classes >= 0, f"config.data.num_classes={da.num_classes} must be >= 0 (0 = unconditional)")
    check(
        da.num_classes == 0 or da.label_key != "",
        f"config.data.label_key='' (no labels) but config.data.num_classes={da.num_classes}: a class-conditional "
        "model needs the label feature",
    )

    excluded = tuple(da.exclude_labels)
    check(
        all(y >= 0 for y in excluded) and len(set(excluded)) == len(excluded),
        f"config.data.exclude_labels={excluded} must be distinct labels >= 0",
    )
    check(
        not excluded or da.label_key != "",
        f"config.data.exclude_labels={excluded} needs the label feature, but config.data.label_key=''",
    )

    # The data's shape and the frames a training example takes.
    shape = tuple(config.data.video_shape)
    check(len(shape) == 4 and min(shape) > 0, f"config.data.video_shape={shape} must be (T, H, W, C) > 0")
    check(
        0 <= config.data.num_frames <= shape[0],
        f"config.data.num_frames={config.data.num_frames} must be in [0, {shape[0]}] (0 = all frames)",
    )
    check(config.data.frame_stride >= 1, f"config.data.frame_stride={config.data.frame_stride} must be >= 1")
    t = input_shape(config)[0]
    window = (t - 1) * config.data.frame_stride + 1
    check(
        window <= shape[0],
        f"config.data.num_frames={config.data.num_frames} with frame_stride={config.data.frame_stride} needs a "
        f"window of {window} frames, but the videos have {shape[0]}",
    )
    if config.data.name == moving_shapes.NAME:
        _one_of(config, "data.builder_config", moving_shapes.CONFIG_NAMES)
        stored = moving_shapes.video_shape(config.data.builder_config)
        check(
            shape == stored,
            f"config.data.video_shape={shape} does not match moving_shapes/{config.data.builder_config}, whose "
            f"videos are {stored}",
        )

    # The network's own values (the task of config.model.kind).
    task.validate(config)

    # Latent diffusion.
    lat = config.latent
    check(all(v > 0 for v in lat.std), f"config.latent.std={tuple(lat.std)} must be > 0 (the latents' per-channel std)")
    check(lat.autoencoder_step >= -1, f"config.latent.autoencoder_step={lat.autoencoder_step} must be >= -1")
    if lat.autoencoder:
        c_in = input_shape(config)[3]
        check(
            len(lat.mean) == len(lat.std) == c_in,
            f"config.latent.autoencoder={lat.autoencoder!r} needs config.latent.mean and std of one value per latent "
            f"channel ({c_in}); they have {len(lat.mean)} / {len(lat.std)} (the trainer fills them from the dataset)",
        )

    # LoRA fine-tuning.
    lo = config.lora
    check(lo.rank >= 0, f"config.lora.rank={lo.rank} must be >= 0 (0 = off: the whole network is trained)")
    check(lo.alpha > 0, f"config.lora.alpha={lo.alpha} must be > 0 (the update is scaled by alpha / rank)")
    if lo.rank:
        try:
            lora_config(config)
        except ValueError as e:
            raise ConfigError(f"config.lora: {e}") from None
        check(lo.base_workdir != "", "config.lora.rank > 0 needs config.lora.base_workdir (the run to adapt)")
        _check_lora_targets(config, task)
    check(lo.base_step >= -1, f"config.lora.base_step={lo.base_step} must be >= 0, or -1 for the latest")

    # The mesh and the batch.
    try:
        shape_ = mesh_lib.resolve_mesh_shape(config.mesh_shape.to_dict(), num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh_shape: {e}") from None
    try:
        rules = sh.rules_from_config(config.logical_axis_rules)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    known = [name for name, _ in sh.default_rules()]
    for name, _ in rules:
        check(
            name in known,
            f"config.logical_axis_rules names {name!r}, which is not a logical axis of the model; use one of {known}",
        )
    sizes = dict(zip(sh.MESH_AXES, shape_))
    data_ways = sizes[sh.DATA] * sizes[sh.FSDP]
    micro = tr.global_batch_size // tr.grad_accum_steps
    check(
        tr.global_batch_size % tr.grad_accum_steps == 0,
        f"config.train.global_batch_size={tr.global_batch_size} must be divisible by "
        f"grad_accum_steps={tr.grad_accum_steps}",
    )
    check(
        micro % data_ways == 0,
        f"the micro-batch {micro} (global_batch_size / grad_accum_steps) must be divisible by the data axes "
        f"data x fsdp = {data_ways} of mesh {sizes}",
    )
    check(
        tr.global_batch_size % process_count == 0,
        f"config.train.global_batch_size={tr.global_batch_size} must be divisible by the {process_count} processes",
    )
    task.validate_mesh(config, sizes)
