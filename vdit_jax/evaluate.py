"""`python -m vdit_jax.evaluate --samples=runs/demo/samples/samples.npz` -> the synthetic metrics as one JSON line.

The npz holds `videos` uint8 [N, T, H, W, 3] and `prompts` (N moving_shapes captions), as written by
`vdit_jax.sample`. The metrics are defined in `vdit_jax.data.evaluate`.
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
flags.mark_flags_as_required(["samples"])


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


def run(samples: str) -> dict:
    from vdit_jax.data import evaluate

    videos, prompts = load_samples(samples)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = evaluate.evaluate(videos, prompts)
    except ValueError as e:
        raise cli.UsageError(f"--samples={samples!r}: {e}") from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(metrics))
    return metrics


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    cli.run_guarded(run, _SAMPLES.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
