#!/usr/bin/env bash
# Kernel durations of LoRA decode steps under Nsight Compute (docs/benchmarks.md, session 12):
# serves `rev25` + a rank-64 adapter on all seven projections (`lora0`) under `ncu`, which times
# 1,600 kernels from launch SKIP on (decode steps of 64 rows once `pruneval bench` at 64 streams
# is under way), then sums the time per kernel and grid. ncu locks the clocks to base and flushes
# the caches before each kernel, so the figures are longer than in a served step: compare kernels
# with each other, not with step times.
# Usage: BIN=dir-with-binaries CKPT=8b-checkpoint-dir OUT=out-dir [SKIP=60000] bench/lora-ncu.sh
set -euo pipefail
BIN=${BIN:-target/release}
CKPT=${CKPT:?an 8B-shaped checkpoint, as bench/lora.sh writes}
OUT=${OUT:-bench-out}
SKIP=${SKIP:-60000}
PORT=${PORT:-8090}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
[ -d /tmp/lora0 ] || "$BIN/pruneserve" init-lora --like "$CKPT" --rank 64 --alpha 16 --dtype bf16 \
  --std 0.002 --seed 0 /tmp/lora0 > /dev/null
"$NCU" --metrics gpu__time_duration.sum --launch-skip "$SKIP" --launch-count 1600 --csv --page raw \
  --log-file "$OUT/ncu.csv" "$BIN/pruneserve" serve --model "$CKPT" --served-model-name llama8b \
  --variant rev25=reverse:0.25 --variant lora0=reverse:0.25+adapter:/tmp/lora0 --device cuda \
  --kv-cache-gb 40 --max-step-tokens 8192 --port "$PORT" --max-model-len 4096 > "$OUT/ncu-server.log" 2>&1 &
PROFILER=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
timeout 200 "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models lora0 --concurrency 64 \
  --prompt-len 512 --output-len 256 --score-prompts 0 | grep "c=" || true
# Stop the server itself, so that ncu writes its results.
pkill -INT -f "^$BIN/pruneserve serve" || true
for _ in $(seq 20); do kill -0 $PROFILER 2>/dev/null || break; sleep 1; done
pkill -TERM -f "^$BIN/pruneserve serve" || true
wait $PROFILER || true
python3 - "$OUT/ncu.csv" <<'PY'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
at = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr, unit = rows[at], rows[at + 1]
ki, ti, gi = hdr.index("Kernel Name"), hdr.index("gpu__time_duration.sum"), hdr.index("Grid Size")
scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3}.get(unit[ti], 1e-3)
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[at + 2:]:
    try:
        t = float(r[ti].replace(",", "")) * scale
    except (ValueError, IndexError):
        continue
    key = f"{r[ki][:60]} {r[gi]}"
    agg[key][0] += 1
    agg[key][1] += t
print(f"{'total us':>10} {'calls':>6} {'us/call':>8}  kernel (grid)")
for key, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{t:10.1f} {n:6d} {t / n:8.2f}  {key}")
PY
