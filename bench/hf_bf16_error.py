"""The bf16 error an independent engine makes on the selftest's tiny models: HF transformers
prompt logprobs in bf16 vs in f32 (same weights), max abs difference. Reference level for the
selftest's CUDA bf16 vs CPU f32 check. Usage: python3 bench/hf_bf16_error.py KEEP_DIR"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

root = sys.argv[1]
prompts = json.load(open(f"{root}/prompts.json"))
for arch in ["LlamaForCausalLM", "Gemma2ForCausalLM"]:
    lps = {}
    for dtype in [torch.float32, torch.bfloat16]:
        model = AutoModelForCausalLM.from_pretrained(
            f"{root}/{arch}", dtype=dtype, attn_implementation="eager").to("cuda").eval()
        out = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device="cuda")
                logits = model(ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
                out.append(lp.double().cpu())
        lps[dtype] = torch.cat(out)
    diff = (lps[torch.bfloat16] - lps[torch.float32]).abs().max().item()
    print(f"HF transformers {arch}: bf16 vs f32 prompt logprobs max |d| {diff:.2e}", flush=True)
