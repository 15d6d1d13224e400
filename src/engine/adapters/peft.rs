//! PEFT's LoRA format as written by `save_pretrained`: `adapter_config.json` (what is read here,
//! with every field the engine cannot honour refused by name) and the tensor names of
//! `adapter_model.safetensors` (`base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_{A|B}.weight`).
//!
//! Per-module rank and alpha follow PEFT's `get_pattern_key`: the first `rank_pattern` /
//! `alpha_pattern` key (in file order) for which `^(.*\.)?(key)$` matches the module's name
//! (`model.layers.3.self_attn.q_proj`) wins; scaling is `alpha / r`, or `alpha / sqrt(r)` with
//! `use_rslora`.

use std::fmt;

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::AdapterError;

/// The HF names of the seven projections (`q_proj` ... `down_proj`).
pub const PROJECTION_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The seven projections an adapter may target, in the engine's packing order.
pub const MODULES: [Module; 7] = [
    Module::Q,
    Module::K,
    Module::V,
    Module::O,
    Module::Gate,
    Module::Up,
    Module::Down,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The module's name in the model, as PEFT matches patterns against it.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.group(), self.name())
    }

    fn from_name(name: &str) -> Option<Self> {
        MODULES.into_iter().find(|m| m.name() == name)
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A JSON object kept in file order (PEFT tries pattern keys in insertion order).
#[derive(Debug, Clone, Default)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
        }
        d.deserialize_any(Entries(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Targets {
    Regex(String),
    List(Vec<String>),
}

/// `adapter_config.json` (the fields that decide what the tensors mean; others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct PeftConfig {
    peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    target_modules: Option<Targets>,
    #[serde(default)]
    rank_pattern: Ordered<usize>,
    #[serde(default)]
    alpha_pattern: Ordered<f64>,
    bias: Option<String>,
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    fan_in_fan_out: bool,
    pub base_model_name_or_path: Option<String>,
}

/// Who a tensor of the adapter file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorKey {
    pub layer: usize,
    pub module: Module,
    /// `lora_A` (`[r, in]`) or `lora_B` (`[out, r]`).
    pub is_a: bool,
}

/// Parses `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (PEFT may also keep
/// an adapter name before `.weight`).
pub fn parse_tensor_name(name: &str) -> Result<TensorKey, AdapterError> {
    let unsupported = || AdapterError::Tensor {
        name: name.to_string(),
        reason: "only lora_A/lora_B weights of q/k/v/o/gate/up/down projections are supported",
    };
    let rest = name
        .strip_prefix("base_model.model.")
        .unwrap_or(name)
        .strip_prefix("model.layers.")
        .ok_or_else(unsupported)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let (layer, group, module, which) = match parts.as_slice() {
        [layer, group, module, which, "weight"] | [layer, group, module, which, _, "weight"] => {
            (*layer, *group, *module, *which)
        }
        _ => return Err(unsupported()),
    };
    let module = Module::from_name(module)
        .filter(|m| m.group() == group)
        .ok_or_else(unsupported)?;
    let is_a = match which {
        "lora_A" => true,
        "lora_B" => false,
        _ => return Err(unsupported()),
    };
    let layer = layer.parse().map_err(|_| unsupported())?;
    Ok(TensorKey {
        layer,
        module,
        is_a,
    })
}

/// The first pattern whose `^(.*\.)?(pattern)$` matches `path`, as PEFT's `get_pattern_key`.
fn pattern_value<V: Copy>(
    patterns: &[(String, V)],
    path: &str,
    field: &'static str,
) -> Result<Option<V>, AdapterError> {
    for (key, value) in patterns {
        let re = Regex::new(&format!("^(?:.*\\.)?(?:{key})$")).map_err(|e| {
            AdapterError::Unsupported {
                field,
                detail: format!("`{key}` is not a regular expression: {e}"),
            }
        })?;
        if re.is_match(path) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

impl PeftConfig {
    /// Refuses what the engine cannot apply, naming the field.
    pub fn check(&self) -> Result<(), AdapterError> {
        let refuse =
            |field: &'static str, detail: String| Err(AdapterError::Unsupported { field, detail });
        if let Some(t) = self.peft_type.as_deref().filter(|t| *t != "LORA") {
            return refuse("peft_type", format!("`{t}`: only LORA adapters are served"));
        }
        if self.use_dora {
            return refuse("use_dora", "DoRA adapters are not supported".into());
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return refuse("bias", format!("`{b}`: only `none` is supported"));
        }
        if let Some(m) = self.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return refuse(
                "modules_to_save",
                format!(
                    "{m:?}: fully trained modules are not supported (serve them as an overlay)"
                ),
            );
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out", "must be false for these models".into());
        }
        if self.r == 0 {
            return refuse("r", "must be positive".into());
        }
        if let Some(Targets::List(list)) = &self.target_modules {
            for t in list {
                let named = t == "all-linear"
                    || MODULES.iter().any(|m| {
                        let path = m.path(0);
                        path == *t || path.ends_with(&format!(".{t}"))
                    });
                if !named {
                    return refuse(
                        "target_modules",
                        format!("`{t}` is not supported (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether `target_modules` names this module (PEFT: a string is a full-match regex; a list
    /// names modules by their last components; `all-linear` is every projection).
    pub fn targets(&self, module: Module, layer: usize) -> Result<bool, AdapterError> {
        let path = module.path(layer);
        Ok(match &self.target_modules {
            None => true,
            Some(Targets::Regex(r)) if r == "all-linear" => true,
            Some(Targets::Regex(r)) => Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| AdapterError::Unsupported {
                    field: "target_modules",
                    detail: format!("`{r}` is not a regular expression: {e}"),
                })?
                .is_match(&path),
            Some(Targets::List(list)) => list
                .iter()
                .any(|t| t == "all-linear" || path == *t || path.ends_with(&format!(".{t}"))),
        })
    }

    /// The configured rank and the scale of `module` in `layer`.
    pub fn rank_and_scale(
        &self,
        module: Module,
        layer: usize,
    ) -> Result<(usize, f64), AdapterError> {
        let path = module.path(layer);
        let r = pattern_value(&self.rank_pattern.0, &path, "rank_pattern")?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern.0, &path, "alpha_pattern")?
            .unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse_and_others_are_refused() {
        let k = parse_tensor_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight")
            .unwrap();
        assert_eq!((k.layer, k.module, k.is_a), (12, Module::Down, false));
        let k = parse_tensor_name(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        )
        .unwrap();
        assert_eq!((k.layer, k.module, k.is_a), (0, Module::Q, true));
        for bad in [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(parse_tensor_name(bad).is_err(), "{bad}");
        }
    }

    fn config(json: serde_json::Value) -> PeftConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn patterns_follow_peft_in_file_order() {
        // From text: a `json!` value would sort the pattern keys and lose the file's order.
        let c: PeftConfig = serde_json::from_str(
            r#"{"r": 8, "lora_alpha": 16,
                "rank_pattern": {"q_proj": 4, "layers.1.self_attn.q_proj": 2},
                "alpha_pattern": {"down_proj": 8}, "target_modules": ["q_proj", "down_proj"]}"#,
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.rank_and_scale(Module::Q, 1).unwrap(), (4, 4.0));
        assert_eq!(c.rank_and_scale(Module::K, 1).unwrap(), (8, 2.0));
        assert_eq!(c.rank_and_scale(Module::Down, 0).unwrap(), (8, 1.0));
        assert!(c.targets(Module::Q, 3).unwrap());
        assert!(!c.targets(Module::V, 3).unwrap());
        let rs = config(serde_json::json!({"r": 16, "lora_alpha": 8, "use_rslora": true}));
        assert_eq!(rs.rank_and_scale(Module::O, 0).unwrap(), (16, 2.0));
        let re = config(serde_json::json!({"r": 4, "lora_alpha": 4,
            "target_modules": ".*\\.(q_proj|v_proj)"}));
        assert!(re.targets(Module::V, 2).unwrap() && !re.targets(Module::K, 2).unwrap());
    }

    #[test]
    fn unsupported_fields_are_named() {
        for (json, field) in [
            (
                serde_json::json!({"r": 4, "lora_alpha": 4, "use_dora": true}),
                "use_dora",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 4, "bias": "all"}),
                "bias",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 4, "modules_to_save": ["lm_head"]}),
                "modules_to_save",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens"]}),
                "target_modules",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 4, "peft_type": "IA3"}),
                "peft_type",
            ),
        ] {
            let err = config(json).check().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let ok = config(
            serde_json::json!({"r": 4, "lora_alpha": 4, "modules_to_save": null,
            "target_modules": ["q_proj", "self_attn.v_proj", "all-linear"], "bias": "none"}),
        );
        ok.check().unwrap();
    }
}
