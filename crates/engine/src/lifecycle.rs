//! Model lifecycle: loading (on a thread of its own), reloading, unloading, and what the
//! registry says about readiness.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::error::EngineError;
use crate::memory::WeightsHeld;
use crate::models::{LoadedModel, ModelSpec, ModelStatus};
use crate::panics::catch;

/// Why a model did not load: the stage that failed and its cause.
fn load_failure(spec: &ModelSpec, stage: &str, cause: String) -> String {
    let label = spec.version.as_deref().unwrap_or("");
    tracing::error!(model = %spec.name, version = %label, stage = %stage, cause = %cause, "model failed to load");
    cause
}

impl Engine {
    /// Loads (or reloads) a model on a thread of its own. A failed load leaves no entry,
    /// except that a reload failure keeps the previously loaded version.
    pub async fn load(&self, spec: ModelSpec) -> Result<(), String> {
        let previous = self.begin_load(&spec);
        let version_label = spec.version.clone().unwrap_or_default();
        let ready = &self.inner.metrics.model_ready;
        ready.set(&[&spec.name, &version_label], 0.0);
        let started = Instant::now();
        let result = self.load_on_thread(&spec).await;
        let mut reg = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(generator) => {
                self.inner.metrics.model_load_seconds.set(
                    &[&spec.name, &version_label],
                    started.elapsed().as_secs_f64(),
                );
                ready.set(&[&spec.name, &version_label], 1.0);
                let id = self.inner.next_model_id.fetch_add(1, Ordering::Relaxed);
                let weights = WeightsHeld::new(
                    &self.inner.memory,
                    &generator.description().device,
                    generator.weights_bytes(),
                );
                reg.insert(ModelStatus::Ready(Arc::new(LoadedModel {
                    id,
                    spec,
                    generator,
                    weights,
                    loaded_at: std::time::SystemTime::now(),
                })));
                Ok(())
            }
            Err(e) => {
                match previous {
                    Some(prev) => {
                        let was_ready = if prev.is_ready() { 1.0 } else { 0.0 };
                        reg.insert(prev);
                        ready.set(&[&spec.name, &version_label], was_ready);
                    }
                    None => reg.remove(&spec.name, spec.version.as_deref()),
                }
                Err(e)
            }
        }
    }

    /// Registers the model as loading (unless a version it replaces stays up meanwhile);
    /// returns the status it replaces.
    fn begin_load(&self, spec: &ModelSpec) -> Option<ModelStatus> {
        let mut reg = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let previous = reg
            .get(&spec.name, spec.version.as_deref())
            .ok()
            .cloned()
            .filter(|s| spec.version.is_some() || s.spec().version.is_none());
        if previous.is_none() {
            reg.insert(ModelStatus::Loading(Box::new(spec.clone())));
        }
        previous
    }

    /// A thread of its own, not the runtime's blocking pool: a load stuck on its files must
    /// not hold up the runtime's shutdown when the server stops meanwhile.
    async fn load_on_thread(
        &self,
        spec: &ModelSpec,
    ) -> Result<Arc<dyn sdserve_generation::Generator>, String> {
        let loader = self.inner.loader.clone();
        let spec_for_load = spec.clone();
        let (tx, rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("sdserve-load-{}", spec.name))
            .spawn(move || {
                let result = catch(|| loader.load(&spec_for_load));
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            let cause = format!("cannot start a model loading thread: {e}");
            return Err(load_failure(spec, "start", cause));
        }
        match rx.await {
            Ok(Ok(Ok(generator))) => Ok(generator),
            Ok(Ok(Err(cause))) => Err(load_failure(spec, "load", cause)),
            Ok(Err(panic)) => Err(load_failure(
                spec,
                "load",
                format!(
                    "model loading panicked: {} (at {})",
                    panic.message,
                    panic.location.as_deref().unwrap_or("an unknown place")
                ),
            )),
            Err(_) => Err(load_failure(
                spec,
                "load",
                "the model loading thread ended without a result".into(),
            )),
        }
    }

    /// Removes every version of a model; requests already running finish.
    pub fn unload(&self, name: &str) -> Result<(), EngineError> {
        let mut reg = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let versions: Vec<Option<String>> = reg
            .all()
            .filter(|s| s.spec().name == name)
            .map(|s| s.spec().version.clone())
            .collect();
        if !reg.remove_all(name) {
            return Err(EngineError::ModelNotFound {
                name: name.into(),
                version: None,
            });
        }
        for v in versions {
            self.inner
                .metrics
                .model_ready
                .set(&[name, v.as_deref().unwrap_or("")], 0.0);
        }
        Ok(())
    }

    /// Status of one model (newest version when `version` is `None`).
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name, version)
            .cloned()
    }

    /// Every registered model version.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .all()
            .cloned()
            .collect()
    }

    /// Ready for traffic: not draining, at least one model, and every model loaded.
    pub fn is_ready(&self) -> bool {
        let reg = self
            .inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner());
        !self.is_draining() && !reg.is_empty() && reg.all_ready()
    }
}
