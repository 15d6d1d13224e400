//! Writes HF checkpoint directories all-or-nothing: everything goes to a hidden sibling directory
//! that is renamed into place only once complete, so a failure leaves no partial output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{json, Value};

use super::CheckpointError;

/// Shard size above which a new `model-XXXXX-of-YYYYY.safetensors` file is started.
pub const SHARD_BYTES: usize = 4 << 30;

/// A checkpoint being written; dropped without [`CheckpointWriter::finish`] it removes itself.
pub struct CheckpointWriter {
    out_dir: PathBuf,
    staging: PathBuf,
    pending: HashMap<String, Tensor>,
    pending_bytes: usize,
    shards: Vec<(PathBuf, Vec<String>)>,
    total_bytes: usize,
    finished: bool,
    /// The weights file's stem: `model` (`model.safetensors`), or `adapter_model` for adapters.
    weights_stem: &'static str,
}

impl CheckpointWriter {
    /// Starts a checkpoint at `out_dir`, which must not exist yet (or be an empty directory).
    pub fn create(out_dir: &Path) -> Result<Self, CheckpointError> {
        if out_dir.exists() {
            let empty = std::fs::read_dir(out_dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(CheckpointError::file(
                    out_dir,
                    "output directory exists and is not empty",
                ));
            }
        }
        let parent = out_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| CheckpointError::file(parent, e))?;
        let name = out_dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| CheckpointError::file(&staging, e))?;
        Ok(Self {
            out_dir: out_dir.to_path_buf(),
            staging,
            pending: HashMap::new(),
            pending_bytes: 0,
            shards: Vec::new(),
            total_bytes: 0,
            finished: false,
            weights_stem: "model",
        })
    }

    /// Names the weights file `<stem>.safetensors` (PEFT adapters: `adapter_model`).
    pub fn weights_named(mut self, stem: &'static str) -> Self {
        self.weights_stem = stem;
        self
    }

    /// Adds one tensor; shards are flushed to disk as they fill.
    pub fn add(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<(), CheckpointError> {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        if self.pending_bytes > 0 && self.pending_bytes + bytes > SHARD_BYTES {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.insert(name.into(), tensor);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CheckpointError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self
            .staging
            .join(format!("shard-{}.tmp", self.shards.len()));
        candle_core::safetensors::save(&self.pending, &path)?;
        let mut names: Vec<String> = self.pending.drain().map(|(k, _)| k).collect();
        names.sort();
        self.shards.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Writes a small file (JSON, tokenizer, template) into the checkpoint.
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let path = self.staging.join(name);
        std::fs::write(&path, bytes).map_err(|e| CheckpointError::file(&path, e))
    }

    pub fn add_json(&self, name: &str, value: &Value) -> Result<(), CheckpointError> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CheckpointError::Config(e.to_string()))?;
        self.add_file(name, text.as_bytes())
    }

    /// Copies a file from another directory if it exists there.
    pub fn copy_if_exists(&self, from_dir: &Path, name: &str) -> Result<(), CheckpointError> {
        let src = from_dir.join(name);
        if src.exists() {
            let dst = self.staging.join(name);
            std::fs::copy(&src, &dst).map_err(|e| CheckpointError::file(&src, e))?;
        }
        Ok(())
    }

    /// Names the shards, writes the index and moves the directory into place.
    pub fn finish(mut self) -> Result<PathBuf, CheckpointError> {
        self.flush()?;
        let n = self.shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, (tmp, names)) in self.shards.iter().enumerate() {
            let stem = self.weights_stem;
            let file = if n == 1 {
                format!("{stem}.safetensors")
            } else {
                format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            std::fs::rename(tmp, self.staging.join(&file))
                .map_err(|e| CheckpointError::file(tmp, e))?;
            for name in names {
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
        }
        if n > 1 {
            let index =
                json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
            self.add_json(
                &format!("{}.safetensors.index.json", self.weights_stem),
                &index,
            )?;
        }
        if self.out_dir.exists() {
            std::fs::remove_dir(&self.out_dir)
                .map_err(|e| CheckpointError::file(&self.out_dir, e))?;
        }
        std::fs::rename(&self.staging, &self.out_dir)
            .map_err(|e| CheckpointError::file(&self.out_dir, e))?;
        self.finished = true;
        Ok(self.out_dir.clone())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
