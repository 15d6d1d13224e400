#!/usr/bin/env bash
# Device smoke run of fine-tuning (docs/benchmarks.md): a CUDA server with a small random Llama, a job
# through the API with the reference trainer on the GPU, the served adapter vs transformers + peft.
# Expects .dev/pruneserve.xz (the CUDA build, xz), .dev/smol/{config.json,tokenizer.json,tokenizer_config.json}
# (SmolLM2's), run through the device tool with those carried: `bash bench/finetune-smoke.sh`.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
W=/tmp/w; mkdir -p $W; xz -dc .dev/pruneserve.xz > $W/pruneserve; chmod +x $W/pruneserve
B=$W/pruneserve
$B init-random --like .dev/smol/config.json $W/tiny --layers 4 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --head-dim 64 --tokenizer .dev/smol/tokenizer.json --seed 3 >/dev/null
python3 - <<'PY'
import json
with open('/tmp/w/train.jsonl','w') as f:
    for i in range(64):
        a,b=i%9+1,(i*7)%9+1
        f.write(json.dumps({"messages":[{"role":"user","content":f"What is {a} plus {b}?"},{"role":"assistant","content":f"{a} plus {b} is {a+b}."}]})+"\n")
PY
$B serve --device cuda --model $W/tiny --served-model-name tiny --variant half=drop:1-2 --port 8124 --state-dir $W/state --trainer-device cuda > $OUT/server.log 2>&1 &
for _ in $(seq 60); do curl -sf localhost:8124/health >/dev/null && break; sleep 0.5; done
F=$(curl -s localhost:8124/v1/files -F purpose=fine-tune -F file=@$W/train.jsonl | python3 -c "import json,sys;print(json.load(sys.stdin)['id'])")
J=$(curl -s localhost:8124/v1/fine_tuning/jobs -H content-type:application/json -d "{\"model\":\"half\",\"training_file\":\"$F\",\"hyperparameters\":{\"learning_rate_multiplier\":10},\"pruneserve\":{\"lora_r\":16,\"warmup_steps\":0,\"max_steps\":40,\"lora_dropout\":0}}" | python3 -c "import json,sys;print(json.load(sys.stdin)['id'])")
for _ in $(seq 150); do S=$(curl -s localhost:8124/v1/fine_tuning/jobs/$J | python3 -c "import json,sys;print(json.load(sys.stdin)['status'])"); [ "$S" = succeeded -o "$S" = failed ] && break; sleep 0.5; done
curl -s localhost:8124/v1/fine_tuning/jobs/$J > $OUT/job.json
curl -s "localhost:8124/v1/fine_tuning/jobs/$J/events?limit=200" | python3 -c "import json,sys;[print(e['message']) for e in reversed(json.load(sys.stdin)['data'])]" | grep -v "Step [0-9]*[1-9]/" 
python3 - <<'PY'
import json, os, subprocess, urllib.request
job = json.load(open(os.environ['OUT'] + '/job.json'))
print(job['status'], job['error'], 'tokens/s', job['pruneserve']['train_tokens_per_second'])
toks = [(i * 7919) % 49000 + 10 for i in range(48)]
def echo(model):
    req = urllib.request.Request('http://127.0.0.1:8124/v1/completions', json.dumps({"model": model, "prompt": [toks], "echo": True, "max_tokens": 0, "logprobs": 0}).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))['choices'][0]['logprobs']['token_logprobs'][1:]
served = echo(job['fine_tuned_model']); plain = echo('half')
ref = json.loads(subprocess.run(['python3', 'tests/reference/peft_logprobs.py'], input=json.dumps({"model_dir": job['pruneserve']['training_checkpoint'], "adapter_dir": job['pruneserve']['adapter_dir'], "tokens": toks}), capture_output=True, text=True).stdout)['logprobs'][1:]
print('CUDA bf16 served ft adapter vs peft f32 CPU: max |d| %.3e nats; plain plan vs peft: %.3e' % (max(abs(a-b) for a,b in zip(served, ref)), max(abs(a-b) for a,b in zip(plain, ref))))
PY
