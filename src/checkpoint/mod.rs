//! Checkpoint I/O, apart from the engine: reading HF model directories (local or from the hub),
//! and the writers behind `import-gguf`, `prune`, `merge` and `init-random`.

pub mod gguf_import;
pub mod gguf_tokenizer;
pub mod lineage;
pub mod merge;
pub mod prune;
pub mod random_init;
pub mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use crate::engine::model::config::{self, Family, LayerAttention, ModelConfig};
pub use lineage::Lineage;

/// Everything that can go wrong reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("config.json: {0}")]
    ModelConfig(#[from] config::ConfigError),
    #[error("{0}")]
    Config(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("gguf: {0}")]
    Gguf(String),
    #[error("invalid layer list: {0}")]
    LayerList(#[from] crate::plan::PlanError),
    #[error("hub: {0}")]
    Hub(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl CheckpointError {
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        CheckpointError::File {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// A resolved HF-style model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weight_files: Vec<PathBuf>,
    pub tokenizer_file: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// End-of-sequence ids from `generation_config.json`, `config.json` and the tokenizer config.
    pub eos_token_ids: Vec<u32>,
    pub lineage: Option<Lineage>,
}

pub(crate) fn read_json(path: &Path) -> Result<Value, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::file(path, e))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, CheckpointError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special-token entry in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ModelDir {
    /// Opens a local directory, or fetches a hub model id with `hf-hub` (its cache and
    /// `HF_HUB_OFFLINE` honoured).
    pub fn resolve(id_or_path: &str) -> Result<Self, CheckpointError> {
        let path = Path::new(id_or_path);
        if path.is_dir() {
            return Self::open(path);
        }
        if path.exists() || id_or_path.starts_with('.') || id_or_path.starts_with('/') {
            return Err(CheckpointError::file(path, "not a model directory"));
        }
        Self::open(&fetch_from_hub(id_or_path)?)
    }

    /// Opens a local HF model directory.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config = ModelConfig::from_json(read_json(&dir.join("config.json"))?)?;
        let weight_files = weight_files(dir)?;
        let tokenizer_file = dir.join("tokenizer.json");
        if !tokenizer_file.exists() {
            return Err(CheckpointError::file(&tokenizer_file, "missing"));
        }
        let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => tok_cfg
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string),
        };
        let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut eos: BTreeSet<u32> = gen_cfg
            .get("eos_token_id")
            .and_then(|v| serde_json::from_value::<config::TokenIds>(v.clone()).ok())
            .map(|t| t.ids())
            .unwrap_or_default()
            .into_iter()
            .collect();
        eos.extend(config.eos_token_ids.iter().copied());
        Ok(Self {
            path: dir.to_path_buf(),
            weight_files,
            tokenizer_file,
            chat_template,
            bos_token: token_string(tok_cfg.get("bos_token")),
            eos_token: token_string(tok_cfg.get("eos_token")),
            eos_token_ids: eos.into_iter().collect(),
            lineage: Lineage::read(dir)?,
            config,
        })
    }

    /// Loads the tokenizer; eos ids named only by the tokenizer config's `eos_token` are added.
    pub fn load_tokenizer(&mut self) -> Result<tokenizers::Tokenizer, CheckpointError> {
        let tok = tokenizers::Tokenizer::from_file(&self.tokenizer_file)
            .map_err(|e| CheckpointError::file(&self.tokenizer_file, e))?;
        if let Some(id) = self.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(tok)
    }
}

/// The `*.safetensors` files of a directory: those listed by the shard index, else all of them.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CheckpointError::file(&index, "no weight_map"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CheckpointError::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CheckpointError::file(dir, "no *.safetensors weight files"));
    }
    Ok(files)
}

/// Downloads (or finds in the local cache) the files of a hub model.
fn fetch_from_hub(model_id: &str) -> Result<PathBuf, CheckpointError> {
    let hub = |e: &dyn std::fmt::Display| CheckpointError::Hub(format!("{model_id}: {e}"));
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cache = hf_hub::Cache::from_env();
    let wanted = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model.safetensors",
    ];
    if offline {
        let repo = cache.model(model_id.to_string());
        let config = repo
            .get("config.json")
            .ok_or_else(|| hub(&"not in the local cache and HF_HUB_OFFLINE is set"))?;
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok(dir);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| hub(&e))?;
    let repo = api.model(model_id.to_string());
    let config = repo.get("config.json").map_err(|e| hub(&e))?;
    for f in &wanted[1..] {
        if let Ok(path) = repo.get(f) {
            if *f == "model.safetensors.index.json" {
                let index = read_json(&path)?;
                let shards: BTreeSet<String> = index
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.values()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                for shard in shards {
                    repo.get(&shard).map_err(|e| hub(&e))?;
                }
            }
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}
