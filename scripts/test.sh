#!/usr/bin/env bash
# Installs what the tests need (Python reference deps, the default model) and runs every test.
# The same command runs in CI (.ci/run) and on a developer machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# A target directory outside the clone keeps reruns incremental.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pruneserve/target}
# The comparison chart's font (plotters renders text with DejaVu Sans).
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q >/dev/null && apt-get install -y -q fonts-dejavu-core >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r tests/reference/requirements.txt
# The reference trainer's stack (torch, transformers, peft: ~4.9 GB with torch's CUDA libraries)
# in a venv kept between runs, rebuilt only when its requirements change.
TRAINER_VENV=$HOME/.cache/pruneserve/trainer-venv
TRAINER_REQ=tests/reference/trainer-requirements.txt
if ! cmp -s "$TRAINER_REQ" "$TRAINER_VENV/requirements.txt"; then
  rm -rf "$TRAINER_VENV"
  python3 -m venv "$TRAINER_VENV"
  "$TRAINER_VENV/bin/pip" install -q --disable-pip-version-check -r "$TRAINER_REQ"
  cp "$TRAINER_REQ" "$TRAINER_VENV/requirements.txt"
fi
export PRUNESERVE_TRAINER_PYTHON="$TRAINER_VENV/bin/python"
cargo build --quiet --bin pruneserve
PRUNESERVE_BIN="$CARGO_TARGET_DIR/debug/pruneserve" scripts/fetch-default-model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo test --workspace
