#!/usr/bin/env python3
"""Independent float64 numpy forward of an HF checkpoint directory (Llama, Qwen2, Mistral, Gemma2),
written from the HF modelling code's definitions, for checking pruneserve's decoder.

stdin:  {"model": DIR, "prompts": [[ids...], ...], "overrides": {config key: value}?,
         "layers": [base layers to run, in order]?, "adapter": PEFT DIR?, "overlay": DIR?,
         "map_lineage": bool?, "kv_fp8": bool?}
stdout: {"logprobs": [[logprob of token i+1 given tokens 0..i, ...], ...],
         "last_logits": [[vocab floats of the final position], ...]}

An adapter is merged into the weights as PEFT's merge_and_unload does (W + scale * B @ A, scale
alpha/r or alpha/sqrt(r) with rslora, rank_pattern/alpha_pattern by PEFT's get_pattern_key); an
overlay's tensors replace the model's. With "map_lineage", layer i of an adapter or overlay
directory that carries pruneserve_lineage.json is base layer kept_layers[i]. With "kv_fp8",
every key (after the rotary embedding) and value is rounded to OCP fp8 E4M3 with a scale of 1
before attention, as `--kv-cache-dtype fp8` keeps them.
"""
import json
import math
import re
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def read_safetensors(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[8 + n + a : 8 + n + b]
        if info["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]])
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def load(model_dir):
    d = Path(model_dir)
    weights = {}
    for f in sorted(d.glob("*.safetensors")):
        weights.update(read_safetensors(f))
    return weights, json.loads((d / "config.json").read_text())


def lineage_map(d, on):
    f = Path(d) / "pruneserve_lineage.json"
    if not on or not f.exists():
        return lambda i: i
    kept = json.loads(f.read_text())["kept_layers"]
    return lambda i: kept[i]


def rename_layer(name, to_base):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    return f"model.layers.{to_base(int(m.group(1)))}.{m.group(2)}" if m else name


def pattern_value(patterns, path, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def merge_adapter(w, d, map_lineage):
    cfg = json.loads((Path(d) / "adapter_config.json").read_text())
    t = read_safetensors(Path(d) / "adapter_model.safetensors")
    to_base = lineage_map(d, map_lineage)
    for name, a in t.items():
        if ".lora_A." not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = t[name.replace(".lora_A.", ".lora_B.")]
        r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        assert a.shape[0] == r, (name, a.shape, r)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        target = rename_layer(module, to_base) + ".weight"
        w[target] = w[target] + scale * (b @ a)


def apply_overlay(w, d, map_lineage):
    to_base = lineage_map(d, map_lineage)
    for f in sorted(Path(d).glob("*.safetensors")):
        for name, t in read_safetensors(f).items():
            w[rename_layer(name, to_base)] = t


def rotate_half_rope(x, positions, theta, scaling):
    # x: [T, H, D], HF layout: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        old = scaling["original_max_position_embeddings"]
        lo, hi, f = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        scaled = np.where(wl > old / lo, inv / f, inv)
        mid = (wl <= old / lo) & (wl >= old / hi)
        inv = np.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
    ang = positions[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x * cos + rot * sin


def round_e4m3(x):
    """Nearest E4M3 value (3 mantissa bits, exponents -6..8, subnormal steps of 2^-9), ties to
    the even mantissa, saturating at +-448."""
    a = np.abs(x)
    e = np.floor(np.log2(np.maximum(a, 2.0**-6)))
    step = 2.0 ** (e - 3)
    return np.sign(x) * np.minimum(np.round(a / step) * step, 448.0)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def forward(w, cfg, ids, layers=None, kv_fp8=False):
    arch = cfg["architectures"][0]
    gemma = arch == "Gemma2ForCausalLM"
    nh, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or hidden // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0 if arch in ("LlamaForCausalLM", "Gemma2ForCausalLM") else 1e6)
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)

    def norm(x, name):
        g = w[name + ".weight"]
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return y * (1 + g) if gemma else y * g

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        return y

    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    x = w["model.embed_tokens.weight"][np.array(ids)]
    if gemma:
        x = x * math.sqrt(hidden)
    scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else hd**-0.5
    for i in layers if layers is not None else range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if types is not None:
            sliding = types[i] == "sliding_attention"
        elif gemma:
            sliding = i % 2 == 0
        elif arch == "MistralForCausalLM":
            sliding = window is not None
        else:
            sliding = False
        allowed = np.tril(np.ones((t, t), dtype=bool))
        if sliding and window:
            allowed &= ~np.tril(np.ones((t, t), dtype=bool), -window)
        h = norm(x, p + "input_layernorm")
        q = rotate_half_rope(lin(h, p + "self_attn.q_proj").reshape(t, nh, hd), pos, theta, cfg.get("rope_scaling"))
        k = rotate_half_rope(lin(h, p + "self_attn.k_proj").reshape(t, nkv, hd), pos, theta, cfg.get("rope_scaling"))
        v = lin(h, p + "self_attn.v_proj").reshape(t, nkv, hd)
        if kv_fp8:
            k, v = round_e4m3(k), round_e4m3(v)
        out = np.empty((t, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].T * scale
            cap = cfg.get("attn_logit_softcapping") if gemma else None
            if cap:
                s = np.tanh(s / cap) * cap
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        a = lin(out.reshape(t, nh * hd), p + "self_attn.o_proj")
        if gemma:
            a = norm(a, p + "post_attention_layernorm")
        x = x + a
        h = norm(x, p + ("pre_feedforward_layernorm" if gemma else "post_attention_layernorm"))
        g = lin(h, p + "mlp.gate_proj")
        act = gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
        m = lin(act * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        if gemma:
            m = norm(m, p + "post_feedforward_layernorm")
        x = x + m
    x = norm(x, "model.norm")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    cap = cfg.get("final_logit_softcapping") if gemma else None
    if cap:
        logits = np.tanh(logits / cap) * cap
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return [float(lsm[i, ids[i + 1]]) for i in range(t - 1)], logits[-1].tolist()


def main():
    req = json.load(sys.stdin)
    w, cfg = load(req["model"])
    cfg.update(req.get("overrides") or {})
    if req.get("adapter"):
        merge_adapter(w, req["adapter"], req.get("map_lineage", False))
    if req.get("overlay"):
        apply_overlay(w, req["overlay"], req.get("map_lineage", False))
    results = [forward(w, cfg, p, req.get("layers"), req.get("kv_fp8", False)) for p in req["prompts"]]
    json.dump({"logprobs": [r[0] for r in results], "last_logits": [r[1] for r in results]}, sys.stdout)


if __name__ == "__main__":
    main()
