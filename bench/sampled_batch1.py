"""Sampled batch-1 decoding through a running server: one `/v1/completions` request at a time,
512 tokens at temperature 0.9 / top_p 0.95 with `ignore_eos`, seeds 0-2, an 8-token prompt;
prints each request's output tok/s over its whole wall time (docs/benchmarks.md, session 20).
Usage: python3 bench/sampled_batch1.py http://127.0.0.1:8013 [MODEL]"""
import json
import sys
import time
import urllib.request


def main():
    url = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "llama8b"
    for seed in range(3):
        body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 512,
                "temperature": 0.9, "top_p": 0.95, "seed": seed, "ignore_eos": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        start = time.time()
        with urllib.request.urlopen(req) as resp:
            out = json.load(resp)
        wall = time.time() - start
        n = out["usage"]["completion_tokens"]
        print(f"sampled batch 1: {n} tokens in {wall:.2f} s = {n / wall:.1f} tok/s")


if __name__ == "__main__":
    main()
