//! Builds an HF `tokenizer.json` from the vocabulary, merges and pre-tokenizer name stored in a
//! GGUF file (`tokenizer.ggml.*`, BPE / "gpt2" models).

use serde_json::{json, Value};

use super::CheckpointError;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The pieces a GGUF file carries about its tokenizer.
pub struct GgufVocab {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    pub add_bos: bool,
    pub bos_token: Option<String>,
}

/// The pre-tokenizer llama.cpp uses for each `tokenizer.ggml.pre` name, in HF form.
fn pre_tokenizer(pre: &str) -> Result<Value, CheckpointError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => {
            return Err(CheckpointError::Tokenizer(format!(
                "GGUF pre-tokenizer `{other}` is not supported (supported: gpt2, smollm, starcoder, llama-bpe, qwen2)"
            )))
        }
    })
}

/// The `tokenizer.json` document for a GGUF vocabulary.
pub fn tokenizer_json(v: &GgufVocab) -> Result<Value, CheckpointError> {
    if v.model != "gpt2" {
        return Err(CheckpointError::Tokenizer(format!(
            "GGUF tokenizer model `{}` is not supported (supported: gpt2 byte-level BPE)",
            v.model
        )));
    }
    let vocab: serde_json::Map<String, Value> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = v
        .token_types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, &ty)| {
            json!({"id": i, "content": v.tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let post_processor = match (&v.bos_token, v.add_bos) {
        (Some(bos), true) => {
            let id = v.tokens.iter().position(|t| t == bos).unwrap_or(0);
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}}})
        }
        _ => Value::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&v.pre)?,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": v.merges},
    }))
}
