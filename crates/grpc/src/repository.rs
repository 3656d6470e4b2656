//! The model repository calls (index, load, unload) as the service answers them over REST,
//! offered twice as MLServer does: on `inference.GRPCInferenceService` and on the separate
//! `inference.model_repository.ModelRepositoryService`. The two services' messages differ
//! only by package, so the calls are written once here and each service wraps them.

use std::sync::Arc;

use sdserve_protocol::{ModelState, RepositoryIndexItem};
use sdserve_serving::Service;
use tonic::{Request, Response, Status};

use crate::pb::inference as pb;
use crate::pb::inference::model_repository as mr;
use crate::pb::inference::model_repository::model_repository_service_server::ModelRepositoryService;
use crate::status::{check_auth, status};

fn state_name(s: ModelState) -> &'static str {
    match s {
        ModelState::Unknown => "UNKNOWN",
        ModelState::Ready => "READY",
        ModelState::Unavailable => "UNAVAILABLE",
        ModelState::Loading => "LOADING",
        ModelState::Unloading => "UNLOADING",
    }
}

/// Both services' index entry.
macro_rules! index_entry_from {
    ($($t:ty),*) => {$(
        impl From<RepositoryIndexItem> for $t {
            fn from(m: RepositoryIndexItem) -> Self {
                Self {
                    name: m.name,
                    version: m.version.unwrap_or_default(),
                    state: state_name(m.state).into(),
                    reason: m.reason,
                }
            }
        }
    )*};
}

index_entry_from!(
    pb::repository_index_response::ModelIndex,
    mr::repository_index_response::ModelIndex
);

/// Models on disk (re-read every call) and their state in the registry, as over REST.
pub async fn index<T: From<RepositoryIndexItem>>(
    service: &Service,
    only_ready: bool,
) -> Result<Vec<T>, Status> {
    let models = service.index(only_ready).await.map_err(|e| status(&e))?;
    Ok(models.into_iter().map(T::from).collect())
}

/// Loads (or reloads) every version of a model found under the repository root, as over REST.
pub async fn load(service: &Service, name: &str) -> Result<(), Status> {
    service.load_model(name).await.map_err(|e| status(&e))
}

pub fn unload(service: &Service, name: &str) -> Result<(), Status> {
    service.unload_model(name).map_err(|e| status(&e))
}

/// `inference.model_repository.ModelRepositoryService`.
#[derive(Clone)]
pub struct Repository {
    service: Arc<Service>,
}

impl Repository {
    pub fn new(service: Arc<Service>) -> Self {
        Self { service }
    }

    fn auth(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        check_auth(self.service.info.auth_token.as_deref(), metadata)
    }
}

#[tonic::async_trait]
impl ModelRepositoryService for Repository {
    async fn repository_index(
        &self,
        request: Request<mr::RepositoryIndexRequest>,
    ) -> Result<Response<mr::RepositoryIndexResponse>, Status> {
        self.auth(request.metadata())?;
        let models = index(&self.service, request.get_ref().ready).await?;
        Ok(Response::new(mr::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<mr::RepositoryModelLoadRequest>,
    ) -> Result<Response<mr::RepositoryModelLoadResponse>, Status> {
        self.auth(request.metadata())?;
        load(&self.service, &request.get_ref().model_name).await?;
        Ok(Response::new(mr::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<mr::RepositoryModelUnloadRequest>,
    ) -> Result<Response<mr::RepositoryModelUnloadResponse>, Status> {
        self.auth(request.metadata())?;
        unload(&self.service, &request.get_ref().model_name)?;
        Ok(Response::new(mr::RepositoryModelUnloadResponse {}))
    }
}
