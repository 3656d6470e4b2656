//! The model registry: which models exist, their versions and load state.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::EngineError;
use crate::memory::WeightsHeld;
use sdserve_generation::{
    AdapterDeclaration, GenerationDefaults, Generator, Limits, ModelDescription,
};

/// Everything the engine needs to know about one model, taken from its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub version: Option<String>,
    /// The diffusers folder.
    pub uri: PathBuf,
    /// `parameters.extra` as written in model-settings.json.
    pub extra: Map<String, Value>,
    /// `platform` and `versions` (dependency versions), reported in metadata.
    pub platform: String,
    pub versions: Vec<String>,
    /// `parameters.content_type`, reported in metadata.
    pub content_type: Option<String>,
    /// Adaptive batching: on when `max_batch_size > 1` and `max_batch_time > 0`.
    pub max_batch_size: usize,
    pub max_batch_time: Duration,
    pub defaults: GenerationDefaults,
    pub limits: Limits,
    /// LoRA adapters loaded with the model (`parameters.extra.lora`).
    pub adapters: Vec<AdapterDeclaration>,
}

impl ModelSpec {
    pub fn batching(&self) -> bool {
        self.max_batch_size > 1 && !self.max_batch_time.is_zero()
    }
}

/// Builds a generator from a spec (the binary wires the candle pipeline in here).
pub trait ModelLoader: Send + Sync {
    fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Generator>, String>;
}

/// A model ready to serve.
pub struct LoadedModel {
    /// Unique per load: a reloaded model never shares a batch with its predecessor.
    pub id: u64,
    pub spec: ModelSpec,
    pub generator: Arc<dyn Generator>,
    /// Its weights in the memory budget, until the model is dropped.
    pub weights: WeightsHeld,
    /// When it became ready (OpenAI's model list reports it).
    pub loaded_at: std::time::SystemTime,
}

impl LoadedModel {
    pub fn description(&self) -> &ModelDescription {
        self.generator.description()
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("id", &self.id)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub enum ModelStatus {
    Loading(Box<ModelSpec>),
    Ready(Arc<LoadedModel>),
}

impl ModelStatus {
    pub fn spec(&self) -> &ModelSpec {
        match self {
            ModelStatus::Loading(s) => s,
            ModelStatus::Ready(m) => &m.spec,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, ModelStatus::Ready(_))
    }
}

/// Orders versions as MLServer does: numeric when both parse, else as strings; the
/// unversioned model is always the newest.
pub fn compare_versions(a: Option<&str>, b: Option<&str>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(p), Ok(q)) => p.partial_cmp(&q).unwrap_or(Ordering::Equal),
            _ => x.cmp(y),
        },
    }
}

/// name → (version → status).
#[derive(Debug, Default)]
pub struct Registry {
    models: BTreeMap<String, BTreeMap<Option<String>, ModelStatus>>,
}

impl Registry {
    pub fn insert(&mut self, status: ModelStatus) {
        let spec = status.spec();
        self.models
            .entry(spec.name.clone())
            .or_default()
            .insert(spec.version.clone(), status);
    }

    pub fn remove(&mut self, name: &str, version: Option<&str>) {
        if let Some(versions) = self.models.get_mut(name) {
            versions.remove(&version.map(str::to_owned));
            if versions.is_empty() {
                self.models.remove(name);
            }
        }
    }

    pub fn remove_all(&mut self, name: &str) -> bool {
        self.models.remove(name).is_some()
    }

    /// The named version, or the newest when `version` is `None`.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<&ModelStatus, EngineError> {
        let not_found = || EngineError::ModelNotFound {
            name: name.into(),
            version: version.map(str::to_owned),
        };
        let versions = self.models.get(name).ok_or_else(not_found)?;
        match version {
            Some(v) => versions.get(&Some(v.to_owned())).ok_or_else(not_found),
            None => versions
                .iter()
                .max_by(|a, b| compare_versions(a.0.as_deref(), b.0.as_deref()))
                .map(|(_, s)| s)
                .ok_or_else(not_found),
        }
    }

    pub fn ready(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<LoadedModel>, EngineError> {
        match self.get(name, version)? {
            ModelStatus::Ready(m) => Ok(m.clone()),
            ModelStatus::Loading(_) => Err(EngineError::ModelNotReady {
                name: name.into(),
                version: version.map(str::to_owned),
            }),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &ModelStatus> {
        self.models.values().flat_map(|v| v.values())
    }

    pub fn all_ready(&self) -> bool {
        self.all().all(ModelStatus::is_ready)
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_matches_mlserver() {
        assert_eq!(compare_versions(Some("2"), Some("10")), Ordering::Less);
        assert_eq!(compare_versions(Some("b"), Some("a")), Ordering::Greater);
        assert_eq!(compare_versions(None, Some("99")), Ordering::Greater);
    }
}
