#!/usr/bin/env bash
# Data parallelism on two GPUs with an adapter (#15), then the selftest: a tiny random Llama with a
# random rank-16 adapter served by `--data-parallel 2` and by one engine; a long request holds
# engine 0 (cuda:0), so the adapter request goes to engine 1, which loads its own copy on cuda:1;
# its tokens and logprobs are compared with the one-engine server's.
# Usage: BIN=dir-with-pruneserve TOKENIZER_DIR=dir-with-SmolLM2-config-and-tokenizer OUT=dir \
#   bench/dp-adapter-check.sh
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
B=${BIN:?}/pruneserve; SMOL=${TOKENIZER_DIR:?}; W=$(mktemp -d); mkdir -p "${OUT:?}"
sha256sum "$B"
$B init-random --like $SMOL/config.json $W/tiny --layers 4 --hidden 256 --intermediate 512 \
  --heads 4 --kv-heads 2 --head-dim 64 --tokenizer $SMOL/tokenizer.json --seed 3 > /dev/null
$B init-lora --like $W/tiny --rank 16 --alpha 32 --std 0.02 --seed 5 $W/lora > /dev/null
$B serve --device cuda --model $W/tiny --served-model-name tiny --variant ad=adapter:$W/lora \
  --data-parallel 2 --port 8051 --max-model-len 4096 > $OUT/dp.log 2>&1 &
$B serve --device cuda --model $W/tiny --served-model-name tiny --variant ad=adapter:$W/lora \
  --port 8052 --max-model-len 4096 > $OUT/one.log 2>&1 &
for p in 8051 8052; do for _ in $(seq 120); do curl -sf localhost:$p/health >/dev/null && break; sleep 0.5; done; done
python3 - <<'PY'
import json, threading, time, urllib.request
def post(port, body):
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r))
def metric(port, prefix):
    for l in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode().splitlines():
        if l.startswith(prefix): return float(l.rsplit(" ", 1)[1])
long = {"model": "tiny", "prompt": "a b c", "max_tokens": 3500, "temperature": 0, "ignore_eos": True}
t = threading.Thread(target=post, args=(8051, long)); t.start()
while (metric(8051, 'pruneserve:engine_num_requests_running{engine="cuda:0"') or 0) < 1: time.sleep(0.01)
short = {"model": "ad", "prompt": "hello there", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 1}
got = post(8051, short)["choices"][0]["logprobs"]
still = metric(8051, 'pruneserve:engine_num_requests_running{engine="cuda:0"')
t.join()
want = post(8052, short)["choices"][0]["logprobs"]
plain = post(8052, dict(short, model="tiny"))["choices"][0]["logprobs"]
d = max(abs(a - b) for a, b in zip(got["token_logprobs"], want["token_logprobs"]))
dp = max(abs(a - b) for a, b in zip(plain["token_logprobs"], want["token_logprobs"]))
print("routed:", {e: metric(8051, f'pruneserve:engine_sequences_total{{engine="{e}"') for e in ("cuda:0", "cuda:1")},
      "long request still running on cuda:0 when the adapter one finished:", still == 1)
print("adapter on engine 1 (cuda:1) vs one engine: tokens equal", got["tokens"] == want["tokens"],
      "max |dlogprob| %.2e; adapter moves logprobs by %.2e" % (d, dp))
PY
grep -i "cuda:1\|engines=" $OUT/dp.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160
kill %1 %2 2>/dev/null
timeout 150 $B selftest --device cuda --skip-smollm2 2>&1 | tail -16
