#!/usr/bin/env bash
# The main job: personalize a subject of the bundled benchmark, sample it, and evaluate it on the
# held-out test split.
#
# With SD 1.5 weights available (in the Hugging Face cache, downloadable, or ATTRACTOR_MODEL=DIR),
# this is the real run. Without them (a fresh offline machine, CI), it is a SMOKE RUN on the tiny
# random-weight models bundled in tests/fixtures: every stage runs end to end, the images are noise.
#
#   scripts/demo.sh [SUBJECT] [METHOD]        (defaults: dog ti)
set -euo pipefail
cd "$(dirname "$0")/.."
subject=${1:-dog}
method=${2:-ti}
out=${OUT:-runs/demo}
cargo build --locked --quiet
bin=target/debug/attractor

model=${ATTRACTOR_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
if "$bin" fetch --model "$model" --offline >/dev/null 2>&1; then real=1; else real=0; fi
if [ "$real" = 1 ]; then
  # The real run trains in the release profile: the dev profile builds our own kernels at
  # opt-level 1 (the smoke run below keeps the dev build that `cargo test` shares).
  echo "== building the release binary (cargo build --release)"
  cargo build --release --locked --quiet
  bin=target/release/attractor
fi

"$bin" dataset check

if [ "$real" = 1 ]; then
  echo "== real run: $model, $method on $subject"
  "$bin" train --model "$model" --subject "$subject" --method "$method" --config "configs/$method.toml" --out "$out/$subject-$method"
  "$bin" sample --model "$model" --run "$out/$subject-$method" --prompt "a photo of {} on a beach" --num-images 4 --out "$out/samples"
  "$bin" eval --model "$model" --run "$out/$subject-$method" --split both --out "$out/eval"
else
  echo "== SMOKE RUN: no SD 1.5 weights found (cache/offline). Using the tiny random-weight models in"
  echo "   tests/fixtures: every stage runs, the images are noise. For the real run, download once:"
  echo "   cargo run -- fetch --model stable-diffusion-v1-5/stable-diffusion-v1-5"
  tiny=tests/fixtures/tiny-sd
  rm -rf "$out"
  "$bin" train --model "$tiny" --offline --subject "$subject" --method "$method" --steps 4 --save-every 2 \
    --resolution 128 --batch 1 --grad-accum 1 --out "$out/$subject-$method"
  "$bin" sample --model "$tiny" --offline --run "$out/$subject-$method" --prompt "a photo of {} on a beach" \
    --steps 5 --num-images 2 --out "$out/samples"
  "$bin" eval --model "$tiny" --offline --run "$out/$subject-$method" --split both --samples 1 --steps 3 \
    --clip tests/fixtures/tiny-clip --dino tests/fixtures/tiny-dino --out "$out/eval"
fi
echo "== done: outputs in $out"
