#!/usr/bin/env python3
"""Independent reference for a Llama-architecture GGUF: a float64 numpy forward over the GGUF's own
(dequantized) tensors, using llama.cpp's conventions — interleaved rope on its permuted q/k rows —
so it checks pruneserve's GGUF import (un-permutation, tokenizer-free) and its decoder at once.

stdin:  {"gguf": PATH, "prompts": [[ids...], ...], "layers": [plan's layers]?, "block": n?,
        "logprobs": true?}
stdout: {"logprobs": [[logprob of token i+1 given tokens 0..i, ...], ...]}  (natural log)
        with "block": also {"bi": [per plan layer], "angular": [per block start]}: Block Influence
        (1 - cos(layer input, layer output), mean over each prompt's tokens, then over prompts) and
        arccos(cos(h_l, h_{l+n})) / pi at each prompt's final token, averaged over prompts.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    return reader.fields[key].contents()


def load(path):
    r = GGUFReader(path)
    weights = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        weights[t.name] = w.reshape([int(d) for d in reversed(t.shape)])
    arch = field(r, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"reference supports llama GGUFs, got {arch}")
    cfg = {
        "layers": int(field(r, "llama.block_count")),
        "heads": int(field(r, "llama.attention.head_count")),
        "kv_heads": int(field(r, "llama.attention.head_count_kv")),
        "eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "theta": float(field(r, "llama.rope.freq_base")),
    }
    return weights, cfg


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x, theta):
    # x: [T, H, D]; llama.cpp rotates adjacent pairs (2i, 2i+1) by pos * theta^(-2i/D).
    t, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def cosines(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def forward(weights, cfg, ids, layers, taps):
    emb = weights["token_embd.weight"]
    x = emb[np.array(ids)]
    t = len(ids)
    nh, nkv = cfg["heads"], cfg["kv_heads"]
    d = x.shape[1] // nh
    mask = np.triu(np.full((t, t), -np.inf), 1)
    taps["finals"].append(x[-1].copy())
    for i in layers:
        x_in = x
        p = f"blk.{i}."
        h = rms_norm(x, weights[p + "attn_norm.weight"], cfg["eps"])
        q = rope_interleaved((h @ weights[p + "attn_q.weight"].T).reshape(t, nh, d), cfg["theta"])
        k = rope_interleaved((h @ weights[p + "attn_k.weight"].T).reshape(t, nkv, d), cfg["theta"])
        v = (h @ weights[p + "attn_v.weight"].T).reshape(t, nkv, d)
        out = np.empty((t, nh, d))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head, :] @ k[:, kv, :].T / np.sqrt(d) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, head, :] = s @ v[:, kv, :]
        x = x + out.reshape(t, nh * d) @ weights[p + "attn_output.weight"].T
        h = rms_norm(x, weights[p + "ffn_norm.weight"], cfg["eps"])
        g = h @ weights[p + "ffn_gate.weight"].T
        u = h @ weights[p + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ weights[p + "ffn_down.weight"].T
        taps["bi"].append(float((1 - cosines(x_in, x)).mean()))
        taps["finals"].append(x[-1].copy())
    if not taps["logprobs"]:
        return []
    x = rms_norm(x, weights["output_norm.weight"], cfg["eps"])
    head = weights.get("output.weight", emb)
    logits = x @ head.T
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return [float(lsm[i, ids[i + 1]]) for i in range(t - 1)]


def main():
    req = json.load(sys.stdin)
    weights, cfg = load(req["gguf"])
    layers = req.get("layers", list(range(cfg["layers"])))
    out = {"logprobs": []}
    bi, finals = [], []
    for p in req["prompts"]:
        taps = {"bi": [], "finals": [], "logprobs": req.get("logprobs", True)}
        out["logprobs"].append(forward(weights, cfg, p, layers, taps))
        bi.append(taps["bi"])
        finals.append(np.array(taps["finals"]))
    if "block" in req:
        n = req["block"]
        out["bi"] = np.mean(bi, axis=0).tolist()
        angular = []
        for start in range(len(layers) - n + 1):
            cos = [cosines(f[start], f[start + n]) for f in finals]
            angular.append(float(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi)))
        out["angular"] = angular
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
