"""`python -m vdit_jax.sample --workdir=runs/demo --prompt="a red square moving right" --num=8 --steps=50`.

Loads the EMA parameters of a training run's latest (or --step) checkpoint and writes one .mp4 and .gif per sample
plus samples.npz (`videos` uint8 [N, T, H, W, 3], `prompts`) to --out_dir (default WORKDIR/samples). A LoRA run
samples its base with its adapter merged, and --lora=RUN[:SCALE],... merges more adapters; a model trained on
autoencoder latents (`config.latent`) writes the decoded pixels.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags, logging

from vdit_jax import cli
from vdit_jax import config as config_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training run directory (with checkpoints/ and config.json), local or gs://bucket/run."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_PROMPT = flags.DEFINE_string(
    "prompt",
    None,
    'A caption, e.g. "a red square moving right": free text for models with the built-in text encoder (any words '
    "of its vocabulary), the moving_shapes grammar for class-conditional ones.",
)
_TEXT_EMBEDDINGS = flags.DEFINE_string(
    "text_embeddings",
    None,
    "Models on precomputed text embeddings: an .npz with `text` float [N, L, D] and `text_mask` bool [N, L] (and "
    "optionally `prompts`), one video per row (vdit_jax.data.text_embeddings writes them).",
)
_LABEL = flags.DEFINE_integer("label", None, "A class label (class-conditional models), instead of --prompt.")
_NUM = flags.DEFINE_integer("num", 8, "How many videos. Without --prompt/--label: spread over all classes.")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps (DDIM; DDPM always uses all). Default: config.")
_SAMPLER = flags.DEFINE_string("sampler", None, f"One of {list(config_lib.SAMPLERS)}. Default: config.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic). Default: config.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = off). Default: config.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Videos per jitted sampling call.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory, local or gs:// (default WORKDIR/samples).")
_INIT_VIDEO = flags.DEFINE_string(
    "init_video",
    None,
    "Frame-conditioned models: a samples.npz (`videos` uint8 [N, T, H, W, 3]) or an .mp4/.gif whose first "
    "--given_frames frames are kept; the model generates the rest, one video per clip (the first --num clips). "
    "Without --prompt / --label, a samples.npz's `prompts` condition their clips.",
)
_GIVEN_FRAMES = flags.DEFINE_integer("given_frames", None, "With --init_video: how many leading frames are given.")
_PIPELINE = flags.DEFINE_string(
    "pipeline",
    None,
    "'keyframes+interpolate': --workdir is a keyframe DiT (trained at a frame stride s >= 2) and --interpolator a "
    "U-Net interpolator run; the interpolator fills the s - 1 frames between keyframes (vdit_jax.pipeline).",
)
_INTERPOLATOR = flags.DEFINE_string("interpolator", None, "With --pipeline: the interpolator's training run.")
_INTERPOLATION_STEPS = flags.DEFINE_integer(
    "interpolation_steps", None, "With --pipeline: the interpolator's DDIM steps (default: its config)."
)
_LORA = flags.DEFINE_string(
    "lora",
    None,
    "LoRA adapters merged into --workdir's model before sampling: comma-separated LoRA training runs, each "
    "optionally with a scale, e.g. 'runs/red:1.0,runs/fast:0.5' (W + sum scale * alpha / rank * A @ B). An adapter "
    "made for another base (model config, kernels, rank or targets) is refused, naming the mismatch.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Text models: local dataset dir whose test-split texts are sampled (default as in training)",
)
flags.mark_flags_as_required(["workdir"])


def parse_lora(spec: str | None) -> list[tuple[str, float]]:
    """[(LoRA run, scale)] of a --lora value 'DIR[:SCALE],...' (scale 1.0 by default; the last ':' splits, so a
    gs:// path keeps its own). Raises cli.UsageError for an empty entry or a scale that is not a number."""
    if spec is None:
        return []
    out = []
    for entry in spec.split(","):
        entry = entry.strip()
        path, sep, scale = entry.rpartition(":")
        if not sep or "/" in scale or not scale:  # no scale given (or the ':' was a URL's)
            path, scale = entry, "1.0"
        try:
            value = float(scale)
        except ValueError:
            raise cli.UsageError(f"--lora entry {entry!r}: the scale {scale!r} is not a number (DIR[:SCALE])") from None
        if not path:
            raise cli.UsageError(f"--lora={spec!r} has an empty entry; give DIR[:SCALE],... (LoRA training runs)")
        out.append((path, value))
    return out


def resolve_labels(config, prompt: str | None, label: int | None, num: int) -> tuple[np.ndarray, list[str]]:
    """Labels and prompts for the request; raises cli.UsageError with the allowed values."""
    from vdit_jax.data import sources

    num_classes = config.model.num_classes
    if prompt is not None and label is not None:
        raise cli.UsageError("give --prompt or --label, not both")
    if prompt is not None:
        y = sources.parse_prompt(config, prompt)
        labels = np.full((num,), y, np.int32)
    elif label is not None:
        if not num_classes:
            raise cli.UsageError("--label needs a class-conditional model; this one has num_classes=0")
        if not 0 <= label < num_classes:
            raise cli.UsageError(f"--label={label} is out of range; allowed: 0..{num_classes - 1}")
        labels = np.full((num,), label, np.int32)
    else:
        labels = sources.sample_labels(num, num_classes)
    return labels, [sources.caption(config, int(y)) for y in labels]


def given_frames_from(config, init_video, k: int, num: int) -> tuple[np.ndarray, np.ndarray]:
    """(given_frames float32 [n, T, H, W, C] in [-1, 1], frame_mask bool [n, T]) keeping the first `k` frames of
    each of the first `num` clips of `init_video` (n = min(num, clips)); raises cli.UsageError naming what is wrong.

    A clip stored larger by an integer factor (the sampler's mp4/gif upscale small videos) is averaged back down.
    """
    from vdit_jax import video_io

    t, h, w, c = config_lib.input_shape(config)
    if not config.model.frame_conditioning:
        raise cli.UsageError(
            "--init_video needs a model trained with frame conditioning (config.model.frame_conditioning=True)"
        )
    if c != 3:
        raise cli.UsageError(f"--init_video is for RGB models; this one has {c} channels")
    if not 1 <= k <= t - 1:
        raise cli.UsageError(f"--given_frames={k} must be in [1, {t - 1}] (the model makes {t} frames)")
    try:
        clips = video_io.read_videos(init_video)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"--init_video={init_video}: {e}") from None
    n, frames, ch, cw = clips.shape[:4]
    if frames < k:
        raise cli.UsageError(f"--init_video={init_video} has {frames} frames; --given_frames={k} needs {k}")
    if (ch, cw) != (h, w):
        f = ch // h
        if f < 1 or (ch, cw) != (h * f, w * f):
            raise cli.UsageError(
                f"--init_video={init_video} has {ch}x{cw} frames; the model makes {h}x{w} (or an integer multiple)"
            )
        clips = clips.reshape(n, frames, h, f, w, f, 3).mean(axis=(3, 5)).round().astype(np.uint8)
    clips = clips[:num]
    given = np.zeros((len(clips), t, h, w, c), np.float32)
    given[:, :k] = clips[:, :k].astype(np.float32) / 127.5 - 1.0
    mask = np.zeros((len(clips), t), bool)
    mask[:, :k] = True
    return given, mask


def run(
    workdir,
    *,
    step,
    prompt,
    label,
    num,
    steps,
    sampler,
    eta,
    guidance,
    seed,
    batch_size,
    out_dir,
    data_dir=None,
    init_video=None,
    given_frames=None,
    pipeline=None,
    interpolator=None,
    interpolation_steps=None,
    text_embeddings=None,
    lora=None,
) -> str:
    from vdit_jax import inference, tasks
    from vdit_jax.data import sources

    if num < 1:
        raise cli.UsageError(f"--num={num} must be >= 1")
    if sampler is not None and sampler not in config_lib.SAMPLERS:
        raise cli.UsageError(f"--sampler={sampler!r} is not allowed; use one of {list(config_lib.SAMPLERS)}")
    if eta is not None and eta < 0:
        raise cli.UsageError(f"--eta={eta} must be >= 0")
    if guidance is not None and guidance < 0:
        raise cli.UsageError(f"--guidance={guidance} must be >= 0")
    if batch_size < 1:
        raise cli.UsageError(f"--batch_size={batch_size} must be >= 1")
    if (pipeline is None) != (interpolator is None):
        raise cli.UsageError("--pipeline and --interpolator go together")
    adapters = parse_lora(lora)
    if pipeline is not None and adapters:
        raise cli.UsageError("--lora is not for --pipeline; sample a keyframe model's LoRA run as its --workdir")
    if pipeline is not None:
        return _run_pipeline(
            workdir,
            interpolator,
            pipeline,
            step=step,
            prompt=prompt,
            label=label,
            num=num,
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            interpolation_steps=interpolation_steps,
            seed=seed,
            batch_size=batch_size,
            out_dir=out_dir,
            init_video=init_video,
            data_dir=data_dir,
            text_embeddings=text_embeddings,
        )
    if interpolation_steps is not None:
        raise cli.UsageError("--interpolation_steps is for --pipeline")
    config, params, loaded = inference.load(workdir, step)
    if adapters:
        try:
            params = inference.apply_adapters(
                config, params, [(inference.load_adapter(path), scale) for path, scale in adapters]
            )
        except (ValueError, FileNotFoundError) as e:
            raise cli.UsageError(f"--lora: {e}") from None
    if steps is not None and not 1 <= steps <= config.diffusion.num_timesteps:
        raise cli.UsageError(f"--steps={steps} must be in [1, {config.diffusion.num_timesteps}]")
    given = frame_mask = None
    if (init_video is None) != (given_frames is None):
        raise cli.UsageError("--init_video and --given_frames go together")
    task = tasks.get(config)
    if not task.takes_prompts:  # e.g. the interpolator: keyframe pairs of test clips
        if prompt is not None or label is not None or init_video is not None or text_embeddings is not None:
            raise cli.UsageError(
                f"this run's model (kind {config.model.kind!r}) takes no prompt, label or init video: it samples "
                "its dataset's test split (--num, --seed, --data_dir); for videos from a prompt use --pipeline"
            )
        cond = task.sample_conditions(data_dir or config.data.data_dir or sources.default_data_dir(), num, seed)
        prompts = cond.pop("captions")
        logging.info("sampling %d from step %d of %s", num, loaded, workdir)
        videos = task.sample(
            params,
            cond,
            jax.random.key(seed),
            sampler=sampler,
            steps=steps,
            eta=eta,
            guidance=guidance,
            batch_size=batch_size,
            progress=True,
        )
        return _save(workdir, out_dir, videos, prompts, config.sample.fps)
    if init_video is not None:
        given, frame_mask = given_frames_from(config, init_video, given_frames, num)
        num = len(given)
    text = text_mask = None
    if text_embeddings is not None and not (config.model.text_dim and not sources.builtin_text(config)):
        raise cli.UsageError(
            "--text_embeddings is for models on precomputed text embeddings (model.text_dim > 0 without "
            "model.text_vocab); "
            + ("this one encodes text itself: use --prompt" if config.model.text_dim else "this one takes no text")
        )
    if config.model.text_dim:
        labels, prompts, text, text_mask = _text_conditions(
            config, prompt, label, text_embeddings, init_video, num, seed, data_dir
        )
        num = len(prompts)
        if given is not None and len(given) != num:
            raise cli.UsageError(f"{len(given)} init videos but {num} texts: give as many of each")
    elif init_video is not None and prompt is None and label is None and config.model.num_classes:
        # Continuations of a samples.npz with prompts (e.g. test clips and their captions) keep each clip's prompt.
        from vdit_jax import video_io

        clip_prompts = video_io.read_prompts(init_video)
        if clip_prompts is None:
            labels, prompts = resolve_labels(config, prompt, label, num)
        else:
            prompts = clip_prompts[:num]
            labels = np.array([sources.parse_prompt(config, p) for p in prompts], np.int32)
    else:
        labels, prompts = resolve_labels(config, prompt, label, num)
    logging.info("sampling %d videos from step %d of %s", num, loaded, workdir)
    videos = inference.sample(
        config,
        params,
        labels,
        jax.random.key(seed),
        text=text,
        text_mask=text_mask,
        given_frames=given,
        frame_mask=frame_mask,
        sampler=sampler,
        steps=steps,
        eta=eta,
        guidance=guidance,
        batch_size=batch_size,
        progress=True,
    )
    return _save(workdir, out_dir, videos, prompts, config.sample.fps)


def _text_conditions(config, prompt, label, text_embeddings, init_video, num, seed, data_dir):
    """(labels, prompts, text, text_mask) of a text model's request; raises cli.UsageError naming what is wrong.

    Built-in encoder: --prompt (free text, `num` times), else the prompts of an --init_video samples.npz, else the
    captions `sources.sample_conditions` gives. Precomputed embeddings: --text_embeddings, else texts of the
    dataset's test split."""
    from vdit_jax import video_io
    from vdit_jax.data import sources
    from vdit_jax.data import text_embeddings as embeddings_lib

    if label is not None:
        raise cli.UsageError(
            "--label is for class-conditional models; this one is text-conditional: "
            + ("--prompt" if sources.builtin_text(config) else "--text_embeddings")
        )
    data_dir = data_dir or config.data.data_dir or sources.default_data_dir()
    if sources.builtin_text(config):
        if prompt is not None:
            prompts = [prompt] * num
        else:
            clip_prompts = video_io.read_prompts(init_video) if init_video is not None else None
            prompts = clip_prompts[:num] if clip_prompts else None
        if prompts is None:
            cond = sources.sample_conditions(config, data_dir, num, seed=seed)
            return cond["labels"], cond["captions"], cond["tokens"], cond["text_mask"]
        tokens, mask = sources.encode_prompts(config, prompts)
        return np.zeros((len(prompts),), np.int32), prompts, tokens, mask
    if prompt is not None:
        raise cli.UsageError(
            "this model is conditioned on precomputed text embeddings (free text needs the encoder that made them): "
            "give --text_embeddings=FILE.npz, or nothing to sample texts of its dataset's test split"
        )
    if text_embeddings is not None:
        try:
            text, mask, prompts = embeddings_lib.read_npz(text_embeddings, config.model.text_dim)
        except (ValueError, FileNotFoundError) as e:
            raise cli.UsageError(str(e)) from None
        prompts = prompts or [f"text {i} of {text_embeddings}" for i in range(len(text))]
        return np.zeros((len(text),), np.int32), prompts, text, mask
    cond = sources.sample_conditions(config, data_dir, num, seed=seed)
    return cond["labels"], cond["captions"], cond["text"], cond["text_mask"]


def _save(workdir, out_dir, videos, prompts, fps: int) -> str:
    from vdit_jax import paths, video_io

    out_dir = paths.resolve(out_dir) if out_dir else paths.resolve(workdir) / "samples"
    path = video_io.save_samples(out_dir, videos, prompts, fps=fps)
    print(f"wrote {len(videos)} videos and {path}")
    return path


def _run_pipeline(
    workdir,
    interpolator,
    name,
    *,
    step,
    prompt,
    label,
    num,
    steps,
    sampler,
    guidance,
    interpolation_steps,
    seed,
    batch_size,
    out_dir,
    init_video,
    data_dir=None,
    text_embeddings=None,
) -> str:
    from vdit_jax import pipeline

    if name != pipeline.NAME:
        raise cli.UsageError(f"--pipeline={name!r} is not allowed; use {pipeline.NAME!r}")
    if init_video is not None:
        raise cli.UsageError("--init_video is not for --pipeline (the keyframe model generates every keyframe)")
    try:
        pipe = pipeline.load(workdir, interpolator, step)
    except ValueError as e:
        raise cli.UsageError(f"--pipeline: {e}") from None
    kc, ic = pipe.keyframe_config, pipe.interpolator_config
    if steps is not None and not 1 <= steps <= kc.diffusion.num_timesteps:
        raise cli.UsageError(f"--steps={steps} must be in [1, {kc.diffusion.num_timesteps}]")
    if interpolation_steps is not None and not 1 <= interpolation_steps <= ic.diffusion.num_timesteps:
        raise cli.UsageError(
            f"--interpolation_steps={interpolation_steps} must be in [1, {ic.diffusion.num_timesteps}]"
        )
    text = {}
    if kc.model.text_dim:  # a text keyframe model: --prompt (built-in encoder) or --text_embeddings
        labels, prompts, text["text"], text["text_mask"] = _text_conditions(
            kc, prompt, label, text_embeddings, None, num, seed, data_dir
        )
        num = len(prompts)
    else:
        if text_embeddings is not None:
            raise cli.UsageError("--text_embeddings is for text keyframe models; this one is class-conditional")
        labels, prompts = resolve_labels(kc, prompt, label, num)
    logging.info(
        "sampling %d videos of %d frames: keyframes of %s, frames between from %s",
        num,
        pipe.num_frames,
        workdir,
        interpolator,
    )
    out = pipe.generate(
        labels,
        jax.random.key(seed),
        **text,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        interpolation_steps=interpolation_steps,
        batch_size=batch_size,
        progress=True,
    )
    print(f"keyframes {out.keyframe_seconds:.1f} s, interpolation {out.interpolation_seconds:.1f} s")
    return _save(workdir, out_dir, out.videos, prompts, kc.sample.fps)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    cli.setup_logging()
    cli.run_guarded(
        run,
        _WORKDIR.value,
        step=_STEP.value,
        prompt=_PROMPT.value,
        label=_LABEL.value,
        num=_NUM.value,
        steps=_STEPS.value,
        sampler=_SAMPLER.value,
        eta=_ETA.value,
        guidance=_GUIDANCE.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        out_dir=_OUT_DIR.value,
        data_dir=_DATA_DIR.value,
        init_video=_INIT_VIDEO.value,
        given_frames=_GIVEN_FRAMES.value,
        pipeline=_PIPELINE.value,
        interpolator=_INTERPOLATOR.value,
        interpolation_steps=_INTERPOLATION_STEPS.value,
        text_embeddings=_TEXT_EMBEDDINGS.value,
        lora=_LORA.value,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
