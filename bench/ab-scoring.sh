#!/usr/bin/env bash
# A/B scoring of one base and a plan that runs its first layers (docs/benchmarks.md, "Shared
# hidden states"): the same prompts scored with `echo` + `logprobs` on SmolLM2 alone, then on
# SmolLM2 and `rev25` together (each prompt's two requests sent at once, so they meet in one
# engine step), served without and with --enable-prefix-caching (which turns on shared hidden
# states: `rev25` takes its 22 layers from the base's rows). Wall time of each, the ratio of
# together to alone, and the largest difference between the logprobs of the two servers.
# Usage: bench/ab-scoring.sh [BIN_DIR] [DATA_DIR]   (N=100 prompts of 4 GSM8K questions, CONCURRENCY=8;
#   another model and device through MODEL=served-name SERVE_ARGS="--model DIR --served-model-name
#   NAME --device cuda ..."; the GPU command is in docs/benchmarks.md, session 9; MODES="on" runs
#   only the server with sharing, whose ratio is the benchmark's figure)
set -euo pipefail
BIN=${1:-target/release} DATA=${2:-../shared/data}
N=${N:-100} CONCURRENCY=${CONCURRENCY:-8} PORT=${PORT:-8133} MODEL=${MODEL:-smollm2-135m}
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
for mode in ${MODES:-off on}; do
  start_cache_server "$mode" --variant rev25=reverse:0.25
  python3 - "$DATA/gsm8k/train.jsonl" "$PORT" "$N" "$CONCURRENCY" "$OUT/$mode.json" "$mode" "$MODEL" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
src, port, n, conc, out, mode, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
qs = [json.loads(l)["question"] for l in open(src)]
# Other prompts for each phase, so nothing the first phase left in the prefix cache is reused.
prompts = ["\n\n".join(qs[(4 * i + k) % len(qs)] for k in range(4)) for i in range(2 * n)]
def score(model, prompt):
    body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                               {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r))["choices"][0]["logprobs"]["token_logprobs"]
res = {}
for name, models, part in (("alone", [base], prompts[:n]),
                           ("together", [base, "rev25"], prompts[n:])):
    t = time.time()
    with ThreadPoolExecutor(conc * len(models)) as ex:
        futs = [(m, i, ex.submit(score, m, p)) for i, p in enumerate(part) for m in models]
        got = {(m, i): f.result() for m, i, f in futs}
    res[name] = {"wall_s": time.time() - t, "logprobs": {f"{m}/{i}": v for (m, i), v in got.items()}}
    print(f"cache {mode}: {name}: {res[name]['wall_s']:.1f} s")
print(f"cache {mode}: together / alone = {res['together']['wall_s'] / res['alone']['wall_s']:.2f}")
json.dump(res, open(out, "w"))
PY
  curl -s "localhost:$PORT/metrics" | grep -E "^pruneserve:(prompt_tokens_total|prefix_cache_(hits|queries)_total|shared_prefix_layer_rows_total)" | sed "s/^/cache $mode: /" || true
  stop_server
done
[ -f "$OUT/off.json" ] && [ -f "$OUT/on.json" ] || exit 0
python3 - "$OUT/off.json" "$OUT/on.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["together"]["logprobs"] for p in sys.argv[1:3])
d = max(abs(x - y) for k in a for x, y in zip(a[k][1:], b[k][1:]))
print(f"max |d logprob| between the servers over {len(a)} scored prompts: {d:.2e}")
PY
