//! The model repository calls (index, load, unload) as `POST /v2/repository/*` answers them,
//! and `inference.model_repository.ModelRepositoryService`, which offers the same three.

use sdserve_http::{SharedState, handlers};
use sdserve_protocol::ModelState;
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

fn state_name(s: ModelState) -> &'static str {
    match s {
        ModelState::Unknown => "UNKNOWN",
        ModelState::Ready => "READY",
        ModelState::Unavailable => "UNAVAILABLE",
        ModelState::Loading => "LOADING",
        ModelState::Unloading => "UNLOADING",
    }
}

/// Models on disk (re-read every call) and their state in the registry, as over REST.
pub async fn index(state: &SharedState, only_ready: bool) -> Result<Vec<IndexEntry>, Status> {
    let models = handlers::repository::models(state, only_ready)
        .await
        .map_err(|e| from_api(&e))?;
    Ok(models
        .into_iter()
        .map(|m| IndexEntry {
            name: m.name,
            version: m.version,
            state: state_name(m.state).into(),
            reason: m.reason,
        })
        .collect())
}

/// Loads (or reloads) every version of a model found under the repository root, as over REST.
pub async fn load(state: &SharedState, name: &str) -> Result<(), Status> {
    handlers::repository::load_model(state, name)
        .await
        .map_err(|e| from_api(&e))
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
