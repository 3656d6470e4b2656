//! The model repository calls (index, load, unload) as `POST /v2/repository/*` answers them,
//! and `inference.model_repository.ModelRepositoryService`, which offers the same three.

use std::collections::BTreeMap;

use sdserve_engine::ModelStatus;
use sdserve_http::{ApiError, RepositoryError, SharedState};
use sdserve_protocol::ModelState;
use tonic::codegen::http::StatusCode;
use tonic::{Request, Response, Status};

use crate::pb::inference::model_repository as mr;
use crate::pb::inference::model_repository::model_repository_service_server::ModelRepositoryService;
use crate::status::{check_auth, from_api, from_engine};

/// One index entry.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<String>,
    pub state: String,
    pub reason: String,
}

fn repository_status(e: RepositoryError) -> Status {
    let status = match e {
        RepositoryError::NotFound(_) => StatusCode::NOT_FOUND,
        RepositoryError::Invalid(_) => StatusCode::BAD_REQUEST,
        RepositoryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    from_api(&ApiError::new(status, e.to_string()))
}

fn internal(message: String) -> Status {
    from_api(&ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
}

fn state_name(s: ModelState) -> &'static str {
    match s {
        ModelState::Unknown => "UNKNOWN",
        ModelState::Ready => "READY",
        ModelState::Unavailable => "UNAVAILABLE",
        ModelState::Loading => "LOADING",
        ModelState::Unloading => "UNLOADING",
    }
}

/// Models on disk (re-read every call) and their state in the registry: READY, UNKNOWN
/// while loading, UNAVAILABLE when not loaded.
pub async fn index(state: &SharedState, only_ready: bool) -> Result<Vec<IndexEntry>, Status> {
    let repo = state.repository.clone();
    let on_disk = tokio::task::spawn_blocking(move || repo.list())
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(repository_status)?;
    let mut items: BTreeMap<(String, Option<String>), ModelState> = on_disk
        .into_iter()
        .map(|k| (k, ModelState::Unavailable))
        .collect();
    for status in state.engine.models() {
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
        .map(|((name, version), s)| IndexEntry {
            name,
            version,
            state: state_name(s).into(),
            reason: String::new(),
        })
        .collect())
}

/// Loads (or reloads) every version of a model found under the repository root.
pub async fn load(state: &SharedState, name: &str) -> Result<(), Status> {
    let repo = state.repository.clone();
    let lookup = name.to_owned();
    let specs = tokio::task::spawn_blocking(move || repo.find(&lookup))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(repository_status)?;
    if specs.is_empty() {
        return Err(repository_status(RepositoryError::NotFound(
            name.to_owned(),
        )));
    }
    for spec in specs {
        let label = spec
            .version
            .clone()
            .map(|v| format!("{name} (version {v})"))
            .unwrap_or_else(|| name.to_owned());
        state
            .engine
            .load(spec)
            .await
            .map_err(|e| internal(format!("Model {label} failed to load: {e}")))?;
    }
    Ok(())
}

pub fn unload(state: &SharedState, name: &str) -> Result<(), Status> {
    state.engine.unload(name).map_err(from_engine)
}

/// `inference.model_repository.ModelRepositoryService`.
#[derive(Clone)]
pub struct Repository {
    state: SharedState,
}

impl Repository {
    pub fn new(state: SharedState) -> Self {
        Self { state }
    }

    fn auth(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        check_auth(self.state.config.auth_token.as_deref(), metadata)
    }
}

#[tonic::async_trait]
impl ModelRepositoryService for Repository {
    async fn repository_index(
        &self,
        request: Request<mr::RepositoryIndexRequest>,
    ) -> Result<Response<mr::RepositoryIndexResponse>, Status> {
        self.auth(request.metadata())?;
        let models = index(&self.state, request.get_ref().ready).await?;
        Ok(Response::new(mr::RepositoryIndexResponse {
            models: models
                .into_iter()
                .map(|m| mr::repository_index_response::ModelIndex {
                    name: m.name,
                    version: m.version.unwrap_or_default(),
                    state: m.state,
                    reason: m.reason,
                })
                .collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<mr::RepositoryModelLoadRequest>,
    ) -> Result<Response<mr::RepositoryModelLoadResponse>, Status> {
        self.auth(request.metadata())?;
        load(&self.state, &request.get_ref().model_name).await?;
        Ok(Response::new(mr::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<mr::RepositoryModelUnloadRequest>,
    ) -> Result<Response<mr::RepositoryModelUnloadResponse>, Status> {
        self.auth(request.metadata())?;
        unload(&self.state, &request.get_ref().model_name)?;
        Ok(Response::new(mr::RepositoryModelUnloadResponse {}))
    }
}
