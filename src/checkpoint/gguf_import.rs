//! `import-gguf`: turns a GGUF file into an HF model directory (dequantized safetensors,
//! `config.json`, `tokenizer.json`, chat template, eos/bos ids). llama.cpp stores Llama q/k
//! projection rows permuted for its interleaved rope; they are permuted back to HF's layout.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::gguf_tokenizer::{tokenizer_json, GgufVocab};
use super::writer::CheckpointWriter;
use super::CheckpointError;

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a GValue, CheckpointError> {
    c.metadata
        .get(key)
        .ok_or_else(|| CheckpointError::Gguf(format!("missing metadata `{key}`")))
}

fn meta_u64(c: &Content, key: &str) -> Result<u64, CheckpointError> {
    let v = meta(c, key)?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map_err(|e| CheckpointError::Gguf(format!("`{key}`: {e}")))
}

fn meta_f64(c: &Content, key: &str) -> Result<f64, CheckpointError> {
    let v = meta(c, key)?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| CheckpointError::Gguf(format!("`{key}`: {e}")))
}

fn meta_str(c: &Content, key: &str) -> Option<String> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn meta_strings(c: &Content, key: &str) -> Result<Vec<String>, CheckpointError> {
    let arr = meta(c, key)?
        .to_vec()
        .map_err(|e| CheckpointError::Gguf(format!("`{key}`: {e}")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| CheckpointError::Gguf(format!("`{key}`: {e}")))
        })
        .collect()
}

/// HF tensor name for a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let (base, suffix) = name.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Inverts llama.cpp's `permute(w, n_head)` on q/k projection rows (weights or biases).
fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Imports `gguf_path` into `out_dir` (created all-or-nothing) with weights in `dtype`.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<(), CheckpointError> {
    let file = File::open(gguf_path).map_err(|e| CheckpointError::file(gguf_path, e))?;
    let len = file
        .metadata()
        .map_err(|e| CheckpointError::file(gguf_path, e))?
        .len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| CheckpointError::Gguf(format!("{}: {e}", gguf_path.display())))?;
    // A truncated file shows up as tensor data running past the end.
    for (name, info) in &content.tensor_infos {
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        if content.tensor_data_offset + info.offset + bytes as u64 > len {
            return Err(CheckpointError::Gguf(format!(
                "{}: truncated file (tensor `{name}` runs past the end)",
                gguf_path.display()
            )));
        }
    }
    let arch = meta_str(&content, "general.architecture").unwrap_or_default();
    let (architecture, permute_qk, bias) = match arch.as_str() {
        "llama" => ("LlamaForCausalLM", true, false),
        "qwen2" => ("Qwen2ForCausalLM", false, true),
        other => {
            return Err(CheckpointError::Gguf(format!(
                "architecture `{other}` is not supported (llama, qwen2)"
            )))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let n_head = meta_u64(&content, &k("attention.head_count"))? as usize;
    let n_kv = meta_u64(&content, &k("attention.head_count_kv"))
        .map(|x| x as usize)
        .unwrap_or(n_head);
    let hidden = meta_u64(&content, &k("embedding_length"))? as usize;
    let tokens = meta_strings(&content, "tokenizer.ggml.tokens")?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let bos = meta_u64(&content, "tokenizer.ggml.bos_token_id").ok();
    let eos = meta_u64(&content, "tokenizer.ggml.eos_token_id").ok();
    let mut config = json!({
        "architectures": [architecture],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta_u64(&content, &k("feed_forward_length"))?,
        "num_hidden_layers": meta_u64(&content, &k("block_count"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": meta_u64(&content, &k("rope.dimension_count")).map(|x| x as usize).unwrap_or(hidden / n_head),
        "rms_norm_eps": meta_f64(&content, &k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": meta_f64(&content, &k("rope.freq_base")).unwrap_or(10_000.0),
        "max_position_embeddings": meta_u64(&content, &k("context_length"))?,
        "vocab_size": meta_u64(&content, &k("vocab_size")).map(|x| x as usize).unwrap_or(tokens.len()),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
    });
    if bias {
        config["attention_bias"] = json!(true);
    }
    // Validate the config before writing anything.
    super::ModelConfig::from_json(config.clone())?;

    let vocab = GgufVocab {
        model: meta_str(&content, "tokenizer.ggml.model").unwrap_or_default(),
        pre: meta_str(&content, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
        token_types: meta(&content, "tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().map_err(|e| CheckpointError::Gguf(e.to_string())))?
            .iter()
            .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        merges: meta_strings(&content, "tokenizer.ggml.merges")?,
        add_bos: c_bool(&content, "tokenizer.ggml.add_bos_token"),
        bos_token: bos.and_then(|b| tokens.get(b as usize).cloned()),
        tokens,
    };
    let tokenizer = tokenizer_json(&vocab)?;
    let token_name = |id: Option<u64>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
    let mut tok_cfg = json!({
        "add_bos_token": vocab.add_bos,
        "bos_token": token_name(bos),
        "eos_token": token_name(eos),
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = meta_str(&content, "tokenizer.chat_template") {
        tok_cfg["chat_template"] = json!(t);
    }

    let mut writer = CheckpointWriter::create(out_dir)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let hf = hf_name(name)
            .ok_or_else(|| CheckpointError::Gguf(format!("unexpected tensor `{name}`")))?;
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| CheckpointError::Gguf(format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if permute_qk && hf.contains("self_attn.q_proj") {
            t = unpermute_rows(&t, n_head)?;
        } else if permute_qk && hf.contains("self_attn.k_proj") {
            t = unpermute_rows(&t, n_kv)?;
        }
        writer.add(hf, t.to_dtype(dtype)?)?;
    }
    writer.add_json("config.json", &config)?;
    writer.add_json("tokenizer.json", &tokenizer)?;
    writer.add_json("tokenizer_config.json", &tok_cfg)?;
    writer.add_json(
        "generation_config.json",
        &json!({"bos_token_id": bos, "eos_token_id": eos}),
    )?;
    writer.finish()?;
    Ok(())
}

fn c_bool(c: &Content, key: &str) -> bool {
    c.metadata
        .get(key)
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false)
}
