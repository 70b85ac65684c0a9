#!/usr/bin/env bash
# The multi-stage demo: set up .venv (first run only), build moving_shapes 16x16, train the keyframe DiT and the
# U-Net interpolator on the CPU (configs/multistage.py), sample 84 videos of 16 frames (one per class) through the
# keyframes -> interpolation pipeline, and print the evaluator's JSON with the seams at the keyframes and the
# interpolator's PSNR / SSIM per gap. ROOT (default runs/multistage) may be set. Running it again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh video
ROOT="${ROOT:-runs/multistage}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$(date +%s)
for stage in keyframes interpolator; do
  echo "[multistage] training configs/multistage.py:$stage into $ROOT/$stage"
  python -m vdit_jax.train --config=configs/multistage.py:$stage --workdir="$ROOT/$stage" --config.train.sample_num=0
done
echo "[multistage] sampling 84 videos (keyframes, then the frames between)"
python -m vdit_jax.sample --pipeline=keyframes+interpolate --workdir="$ROOT/keyframes" \
  --interpolator="$ROOT/interpolator" --num=84 --out_dir="$ROOT/samples"
echo "[multistage] evaluating"
python -m vdit_jax.evaluate --samples="$ROOT/samples/samples.npz" --keyframe_stride=5 | tee "$ROOT/eval.json"
python -m vdit_jax.evaluate --interpolator_run="$ROOT/interpolator" --num_clips=256 | tee "$ROOT/interpolation.json"
echo "[multistage] done in $(( $(date +%s) - start )) s; videos in $ROOT/samples/"
