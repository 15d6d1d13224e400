"""HF transformers `generate` on the same checkpoint pruneserve serves, for a side-by-side
throughput ratio: prompt of --prompt-len random token ids, exactly --output-len new tokens
(greedy, EOS ignored), at each batch size. Prints and writes JSON figures."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("--batches", default="1,64")
ap.add_argument("--prompt-len", type=int, default=512)
ap.add_argument("--output-len", type=int, default=256)
ap.add_argument("--json", required=True)
args = ap.parse_args()

model = AutoModelForCausalLM.from_pretrained(
    args.checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa"
).to("cuda").eval()
gen = torch.Generator().manual_seed(0)
rows = []
for batch in [int(b) for b in args.batches.split(",")]:
    ids = torch.randint(1000, 100_000, (batch, args.prompt_len), generator=gen).to("cuda")
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0,
                  max_new_tokens=args.output_len, min_new_tokens=args.output_len)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    new = (out.shape[1] - args.prompt_len) * batch
    rows.append({"batch": batch, "output_tokens": new, "wall_s": wall, "output_tok_per_s": new / wall})
    print(f"HF transformers batch {batch}: {new / wall:.0f} output tok/s ({wall:.1f} s)", flush=True)
json.dump({"hf": rows, "torch": torch.__version__}, open(args.json, "w"), indent=1)
