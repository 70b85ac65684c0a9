#!/usr/bin/env bash
# Text-to-video on the CPU, compositional generalisation: set up .venv (first run only), train configs/text.py's
# `cross` and `joint` variants (the demo's recipe on captions through the built-in text encoder, 12 colour x shape x
# direction combinations left out of training), sample 504 videos each (every class's caption 6 times: 72 held-out,
# 432 seen) and print the evaluator's JSON for the seen and the held-out prompts apart. ROOT (default runs/text)
# may be set; extra arguments go to both trainings. Running it again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh video
ROOT="${ROOT:-runs/text}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
for variant in cross joint; do
  start=$(date +%s)
  echo "[text] training configs/text.py:$variant into $ROOT/$variant"
  python -m vdit_jax.train --config=configs/text.py:$variant --workdir="$ROOT/$variant" --config.train.sample_num=0 "$@"
  echo "[text] $variant trained in $(( $(date +%s) - start )) s"
  python -m vdit_jax.sample --workdir="$ROOT/$variant" --num=504 --out_dir="$ROOT/$variant/samples"
  python -m vdit_jax.evaluate --samples="$ROOT/$variant/samples/samples.npz" --held_out_from="$ROOT/$variant" \
    | tee "$ROOT/$variant/eval.json"
done
