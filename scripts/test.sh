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
cargo build --quiet --bin pruneserve
PRUNESERVE_BIN="$CARGO_TARGET_DIR/debug/pruneserve" scripts/fetch-default-model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo test --workspace
