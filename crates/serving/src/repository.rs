//! The model repository API (index, load, unload), as MLServer answers it over REST and gRPC,
//! and the trait the binary implements to read models from disk.

use std::collections::BTreeMap;

use sdserve_engine::{ModelSpec, ModelStatus};
use sdserve_protocol::{ModelState, RepositoryIndexItem};

use crate::error::{ErrorKind, ServeError};
use crate::service::Service;

/// A model repository problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepositoryError {
    #[error("Model {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

impl From<RepositoryError> for ServeError {
    fn from(e: RepositoryError) -> Self {
        match e {
            RepositoryError::NotFound(_) => ServeError::new(ErrorKind::NotFound, e.to_string()),
            RepositoryError::Invalid(_) => ServeError::invalid(e.to_string()),
            RepositoryError::Failed(_) => ServeError::internal("repository", e.to_string()),
        }
    }
}

/// The models on disk, re-read on every call (as MLServer's index and load do).
pub trait ModelRepository: Send + Sync {
    /// `(name, version)` of every model found under the repository root.
    fn list(&self) -> Result<Vec<(String, Option<String>)>, RepositoryError>;
    /// Every version of one model, only from inside the repository root.
    fn find(&self, name: &str) -> Result<Vec<ModelSpec>, RepositoryError>;
}

/// A name the repository may be searched for: one plain path component. Checked here so that
/// every such name is refused the same way, whatever the repository does with the rest.
fn check_plain_name(name: &str) -> Result<(), ServeError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    if plain {
        return Ok(());
    }
    Err(ServeError::invalid(format!(
        "model name {name:?} is not a plain name (no '/', '\\', '.', '..' or control characters)"
    )))
}

/// Runs blocking repository work (it reads the disk) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RepositoryError> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServeError::internal("repository", e.to_string()))?
        .map_err(ServeError::from)
}

impl Service {
    /// Models on disk and their state in the registry: READY, UNKNOWN while loading,
    /// UNAVAILABLE when not loaded — the states MLServer reports.
    pub async fn index(&self, only_ready: bool) -> Result<Vec<RepositoryIndexItem>, ServeError> {
        let repo = self.repository.clone();
        let on_disk = blocking(move || repo.list()).await?;
        let mut items: BTreeMap<(String, Option<String>), ModelState> = on_disk
            .into_iter()
            .map(|k| (k, ModelState::Unavailable))
            .collect();
        for status in self.engine.models() {
            let spec = status.spec();
            let s = match status {
                ModelStatus::Ready(_) => ModelState::Ready,
                ModelStatus::Loading(_) => ModelState::Unknown,
            };
            items.insert((spec.name.clone(), spec.version.clone()), s);
        }
        Ok(items
            .into_iter()
            .filter(|(_, s)| !only_ready || *s == ModelState::Ready)
            .map(|((name, version), state)| RepositoryIndexItem {
                name,
                version,
                state,
                reason: String::new(),
            })
            .collect())
    }

    /// Loads (or reloads) every version of a model found under the repository root. A failed
    /// load is logged by the engine, with its stage and cause.
    pub async fn load_model(&self, name: &str) -> Result<(), ServeError> {
        check_plain_name(name)?;
        let repo = self.repository.clone();
        let lookup = name.to_owned();
        let specs = blocking(move || repo.find(&lookup)).await?;
        if specs.is_empty() {
            return Err(RepositoryError::NotFound(name.to_owned()).into());
        }
        for spec in specs {
            let label = spec
                .version
                .clone()
                .map(|v| format!("{name} (version {v})"))
                .unwrap_or_else(|| name.to_owned());
            self.engine.load(spec).await.map_err(|e| {
                ServeError::internal("model load", format!("Model {label} failed to load: {e}"))
            })?;
        }
        Ok(())
    }

    /// Removes every version of a model; requests already running finish.
    pub fn unload_model(&self, name: &str) -> Result<(), ServeError> {
        self.engine.unload(name).map_err(ServeError::from)
    }
}
