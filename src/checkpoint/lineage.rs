//! The lineage sidecar (`pruneserve_lineage.json`) that `prune` writes next to a pruned checkpoint,
//! so the server can show which base layers a model on disk was cut from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CheckpointError;

pub const LINEAGE_FILE: &str = "pruneserve_lineage.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Id or path of the model the layers were taken from.
    pub base_model: String,
    pub base_num_layers: usize,
    /// Base layer indices, in the order the pruned model runs them.
    pub kept_layers: Vec<usize>,
    pub dropped_layers: Vec<usize>,
}

impl Lineage {
    pub fn read(dir: &Path) -> Result<Option<Self>, CheckpointError> {
        let path = dir.join(LINEAGE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let v = super::read_json(&path)?;
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| CheckpointError::file(&path, e))
    }
}
