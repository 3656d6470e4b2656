//! The model repository on disk, re-read on every call (repository API).

use std::path::PathBuf;

use sdserve_engine::ModelSpec;
use sdserve_serving::{ModelRepository, RepositoryError};
use sdserve_settings::{Env, discover_models, find_model};

use crate::spec::to_spec;

pub struct FsRepository {
    pub root: PathBuf,
    pub env: Env,
}

impl ModelRepository for FsRepository {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, RepositoryError> {
        let found = discover_models(&self.root, &self.env)
            .map_err(|e| RepositoryError::Failed(e.to_string()))?;
        Ok(found
            .models
            .iter()
            .map(|m| (m.name.clone(), m.version().map(str::to_owned)))
            .collect())
    }

    fn find(&self, name: &str) -> Result<Vec<ModelSpec>, RepositoryError> {
        if name.is_empty()
            || name.contains(['/', '\\'])
            || name == "."
            || name == ".."
            || name.contains('\0')
        {
            return Err(RepositoryError::Invalid(format!(
                "model name {name:?} is not a plain name (no '/', '\\\\', '..')"
            )));
        }
        let found = find_model(&self.root, name, &self.env)
            .map_err(|e| RepositoryError::Failed(e.to_string()))?;
        for w in &found.warnings {
            tracing::warn!("{w}");
        }
        if found.models.is_empty() {
            return Err(RepositoryError::NotFound(name.to_owned()));
        }
        found
            .models
            .iter()
            .map(|m| to_spec(m).map_err(RepositoryError::Failed))
            .collect()
    }
}
