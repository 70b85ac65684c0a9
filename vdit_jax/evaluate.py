"""`python -m vdit_jax.evaluate --samples=runs/demo/samples/samples.npz` -> the synthetic metrics as one JSON line.

The npz holds `videos` uint8 [N, T, H, W, 3] and `prompts` (N moving_shapes captions), as written by
`vdit_jax.sample`. The metrics are defined in `vdit_jax.data.evaluate`. Seams (`evaluate.seams`): with
`--keyframe_stride=s` (pipeline samples) the steps into and out of every inner keyframe, with `--num_given=k`
(continuations) the colour / shape / direction / consistency of the generated frames only and the step from the last
given frame to the first generated one.

`python -m vdit_jax.evaluate --interpolator_run=runs/interp [--num_clips=256] [--ddim_steps=K]` -> PSNR / SSIM of the
interpolator's frames per gap on the test split (DDIM, K steps), with the linear-blending and nearest-keyframe
baselines (one JSON line).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
import zipfile

import numpy as np
from absl import app, flags

from vdit_jax import cli

_SAMPLES = flags.DEFINE_string("samples", None, "A samples.npz with `videos` uint8 [N,T,H,W,3] and `prompts` (str).")
_KEYFRAME_STRIDE = flags.DEFINE_integer("keyframe_stride", None, "--samples from a pipeline: add seams at keyframes.")
_GIVEN = flags.DEFINE_integer(
    "num_given", None, "--samples of continuations of k given frames: metrics of the generated frames, and the seam."
)
_HELD_OUT_FROM = flags.DEFINE_string(
    "held_out_from",
    None,
    "--samples of a model trained without some labels (config.data.exclude_labels): a training run whose held-out "
    "labels split the metrics into `seen` and `held_out` prompts (compositional generalisation).",
)
_INTERPOLATOR = flags.DEFINE_string("interpolator_run", None, "An interpolator's training run: PSNR/SSIM per gap.")
_AUTOENCODER = flags.DEFINE_string(
    "autoencoder_run",
    None,
    "A video autoencoder's training run: PSNR/SSIM of its reconstructions of --num_clips test clips, whole and "
    "decoded in spatial tiles, and the compression ratio.",
)
_NUM = flags.DEFINE_integer("num_clips", 256, "--interpolator_run: test clips per gap.")
_STEPS = flags.DEFINE_integer(
    "ddim_steps",
    None,
    "--interpolator_run: DDIM steps (default: the run's config.sample.steps); 1 gives the model's x0 estimate "
    "from pure noise (its posterior mean: the blurriest output and the highest PSNR).",
)
_DATA_DIR = flags.DEFINE_string(
    "test_data_dir", None, "--interpolator_run / --autoencoder_run: the local data dir (default as in training)."
)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(videos, prompts) from a samples.npz; cli.UsageError naming the file and what is wrong with it."""
    if os.path.isdir(path):
        raise cli.UsageError(f"--samples={path!r} is a directory; give the .npz file (e.g. DIR/samples.npz)")
    if not os.path.isfile(path):
        raise cli.UsageError(f"--samples={path!r}: no such file")
    if not zipfile.is_zipfile(path):
        raise cli.UsageError(f"--samples={path!r} is not an .npz file (as written by vdit_jax.sample)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted({"videos", "prompts"} - set(npz.files))
            if missing:
                raise cli.UsageError(f"--samples={path!r} lacks {missing}; it has {sorted(npz.files)}")
            return npz["videos"], npz["prompts"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, cli.UsageError):
            raise
        raise cli.UsageError(f"--samples={path!r} is not a readable npz of videos and str prompts ({e})") from None


def seam_steps(num_frames: int, keyframe_stride: int | None = None, given_frames: int | None = None) -> list[int]:
    """The frame steps (t: frame t -> t + 1) where a seam could be: into and out of each inner keyframe of a
    pipeline video, or from the last given frame of a continuation; raises cli.UsageError for values that do not
    fit `num_frames`."""
    from vdit_jax.data import evaluate

    if keyframe_stride is not None:
        s = keyframe_stride
        if not 2 <= s <= (num_frames - 1) // 2:
            raise cli.UsageError(
                f"--keyframe_stride={s} must be in [2, {(num_frames - 1) // 2}] for {num_frames} frames"
            )
        return evaluate.keyframe_steps(num_frames, s)
    if not 1 <= given_frames <= num_frames - 2:
        raise cli.UsageError(f"--num_given={given_frames} must be in [1, {num_frames - 2}] for {num_frames} frames")
    return [given_frames - 1]


def run(
    samples: str | None,
    keyframe_stride=None,
    given_frames=None,
    interpolator=None,
    num=256,
    data_dir=None,
    steps=None,
    held_out_from=None,
    autoencoder=None,
):
    from vdit_jax.data import evaluate

    if sum(x is not None for x in (samples, interpolator, autoencoder)) != 1:
        raise cli.UsageError(
            "give --samples (generated videos), --interpolator_run or --autoencoder_run (a training run), one of them"
        )
    if autoencoder is not None:
        return _run_autoencoder(autoencoder, num, data_dir)
    if interpolator is not None:
        return _run_interpolator(interpolator, num, data_dir, steps)
    if steps is not None:
        raise cli.UsageError("--ddim_steps is for --interpolator_run (generated --samples are already sampled)")
    if keyframe_stride is not None and given_frames is not None:
        raise cli.UsageError("give --keyframe_stride or --num_given, not both")
    videos, prompts = load_samples(samples)
    if held_out_from is not None:
        return _run_held_out(videos, prompts, held_out_from, samples)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if given_frames is not None:  # continuations: the attributes of the generated frames only
                seam_steps(videos.shape[1], given_frames=given_frames)
                metrics = evaluate.evaluate(videos[:, given_frames:], prompts)
            else:
                metrics = evaluate.evaluate(videos, prompts)
            if keyframe_stride is not None or given_frames is not None:
                steps = seam_steps(videos.shape[1], keyframe_stride, given_frames)
                metrics.update({f"seam_{k}": v for k, v in evaluate.seams(videos, steps).items() if k != "num_samples"})
    except ValueError as e:
        raise cli.UsageError(f"--samples={samples!r}: {e}") from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(metrics))
    return metrics


def _run_held_out(videos, prompts, workdir, samples) -> dict:
    """{"seen": metrics, "held_out": metrics, "held_out_labels": [...]}: the samples split by whether their prompt's
    label is one the run's training left out (`data.exclude_labels` of its config.json)."""
    from vdit_jax import inference
    from vdit_jax.data import evaluate, moving_shapes

    config = inference.load_config(workdir)
    held_out = {int(y) for y in config.data.exclude_labels}
    if not held_out:
        raise cli.UsageError(f"--held_out_from={workdir!r}: its training left no label out (data.exclude_labels)")
    try:
        labels = np.array([moving_shapes.parse_caption(str(p)) for p in prompts])
    except ValueError as e:
        raise cli.UsageError(f"--samples={samples!r}: {e}") from None
    out = {"held_out_labels": sorted(held_out)}
    for name, rows in (("seen", ~np.isin(labels, sorted(held_out))), ("held_out", np.isin(labels, sorted(held_out)))):
        if not rows.any():
            raise cli.UsageError(f"--samples={samples!r} has no {name.replace('_', '-')} prompt")
        out[name] = evaluate.evaluate(videos[rows], [p for p, r in zip(prompts, rows, strict=True) if r])
    print(json.dumps(out))
    return out


def _run_autoencoder(workdir, num: int, data_dir) -> dict:
    from vdit_jax import inference, tasks
    from vdit_jax.data import sources
    from vdit_jax.tasks import autoencoder as ae_task

    if num < 1:
        raise cli.UsageError(f"--num_clips={num} must be >= 1")
    config, params, step = inference.load(workdir)
    if config.model.kind != ae_task.KIND:
        raise cli.UsageError(f"--autoencoder_run={workdir!r} is a {config.model.kind!r} run, not a video autoencoder")
    data_dir = data_dir or config.data.data_dir or sources.default_data_dir()
    out = {"step": step, **tasks.get(config).evaluate(params, data_dir, num=num)}
    print(json.dumps(out))
    return out


def _run_interpolator(workdir, num: int, data_dir, steps=None) -> dict:
    from vdit_jax import inference, tasks
    from vdit_jax.data import sources

    if num < 1:
        raise cli.UsageError(f"--num_clips={num} must be >= 1")
    config, params, step = inference.load(workdir)
    task = tasks.get(config)
    if not hasattr(task, "evaluate"):
        raise cli.UsageError(f"--interpolator_run={workdir!r} is a {config.model.kind!r} run, not a frame interpolator")
    steps = config.sample.steps if steps is None else steps
    if not 1 <= steps <= config.diffusion.num_timesteps:
        raise cli.UsageError(f"--ddim_steps={steps} must be in [1, {config.diffusion.num_timesteps}]")
    data_dir = data_dir or config.data.data_dir or sources.default_data_dir()
    result = task.evaluate(params, data_dir, num=num, sampler="ddim", steps=steps)
    out = {"step": step, "num_clips": num, "ddim_steps": steps, "gaps": {str(g): v for g, v in result.items()}}
    print(json.dumps(out))
    return out


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    cli.run_guarded(
        run,
        _SAMPLES.value,
        keyframe_stride=_KEYFRAME_STRIDE.value,
        given_frames=_GIVEN.value,
        interpolator=_INTERPOLATOR.value,
        num=_NUM.value,
        data_dir=_DATA_DIR.value,
        steps=_STEPS.value,
        held_out_from=_HELD_OUT_FROM.value,
        autoencoder=_AUTOENCODER.value,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
