#!/usr/bin/env bash
# The demo: set up .venv (first run only), build moving_shapes, train the `tiny` DiT on the CPU, sample 64 videos
# over all 84 classes with DDIM into $WORKDIR/samples/, and print the evaluator's JSON.
# WORKDIR (default runs/demo) may be set; extra arguments go to the trainer (e.g. --config.train.num_steps=200).
# Running it again resumes (or, when training is done, only samples and evaluates).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh video  # the package and its video writers: no dev tools, no libtpu
WORKDIR="${WORKDIR:-runs/demo}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"  # the CPU demo, even in a .venv where the tests installed libtpu
start=$(date +%s)
echo "[demo] training configs/moving_shapes.py:tiny into $WORKDIR"
python -m vdit_jax.train --config=configs/moving_shapes.py:tiny --workdir="$WORKDIR" "$@"
echo "[demo] sampling 64 videos over all classes"
python -m vdit_jax.sample --workdir="$WORKDIR" --num=64 --out_dir="$WORKDIR/samples"
echo "[demo] evaluating $WORKDIR/samples/samples.npz"
python -m vdit_jax.evaluate --samples="$WORKDIR/samples/samples.npz" | tee "$WORKDIR/eval.json"
echo "[demo] done in $(( $(date +%s) - start )) s; videos in $WORKDIR/samples/ (sample_NNN.mp4 / .gif)"
