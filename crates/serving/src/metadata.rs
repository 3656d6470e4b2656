//! Server and model metadata, and readiness, as both transports report them.

use sdserve_engine::ModelStatus;
use sdserve_protocol::diffusers::{input_metadata, output_metadata};
use sdserve_protocol::{MetadataModelResponse, MetadataServerResponse, Parameters};
use serde_json::json;

use crate::error::ServeError;
use crate::service::Service;

impl Service {
    /// `name`, `version` and `extensions` (the transport adds what it implements itself).
    pub fn server_metadata(&self) -> MetadataServerResponse {
        MetadataServerResponse {
            name: self.info.server_name.clone(),
            version: self.info.server_version.clone(),
            extensions: self.info.extensions.clone(),
        }
    }

    /// A model's metadata: the contract's inputs and outputs and what a client needs to build
    /// a valid request.
    pub fn model_metadata(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<MetadataModelResponse, ServeError> {
        let status = self.engine.model(name, version)?;
        let spec = status.spec();
        Ok(MetadataModelResponse {
            name: spec.name.clone(),
            versions: Some(spec.versions.clone()),
            platform: spec.platform.clone(),
            inputs: Some(input_metadata(match &status {
                ModelStatus::Ready(m) => Some(m.description()),
                ModelStatus::Loading(_) => None,
            })),
            outputs: Some(output_metadata()),
            parameters: Some(model_parameters(&status)),
        })
    }

    /// Every ready model by name (the latest load of its versions), sorted by name.
    pub fn ready_models(&self) -> Vec<ReadyModel> {
        let mut by_name: std::collections::BTreeMap<String, std::time::SystemTime> =
            Default::default();
        for status in self.engine.models() {
            if let ModelStatus::Ready(m) = status {
                let at = by_name.entry(m.spec.name.clone()).or_insert(m.loaded_at);
                *at = (*at).max(m.loaded_at);
            }
        }
        by_name
            .into_iter()
            .map(|(name, loaded_at)| ReadyModel { name, loaded_at })
            .collect()
    }

    /// Ready for traffic: not draining, and the model (newest version when `None`) loaded.
    pub fn model_ready(&self, name: &str, version: Option<&str>) -> Result<bool, ServeError> {
        let status = self.engine.model(name, version)?;
        Ok(status.is_ready() && !self.engine.is_draining())
    }
}

/// A model that serves requests now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyModel {
    pub name: String,
    pub loaded_at: std::time::SystemTime,
}

/// A model's metadata `parameters`. MLServer's carry the model's content_type; we add the
/// schedulers, native size and step bounds.
pub fn model_parameters(status: &ModelStatus) -> Parameters {
    let spec = status.spec();
    let mut parameters = Parameters::new();
    if let Some(ct) = &spec.content_type {
        parameters.insert("content_type".into(), json!(ct));
    }
    if let ModelStatus::Ready(m) = status {
        let d = m.description();
        parameters.insert("default_scheduler".into(), json!(d.default_scheduler));
        parameters.insert("schedulers".into(), json!(d.schedulers));
        parameters.insert("native_height".into(), json!(d.native_height));
        parameters.insert("native_width".into(), json!(d.native_width));
        parameters.insert("family".into(), json!(d.family));
        parameters.insert("dtype".into(), json!(d.dtype));
        let adapters: Vec<_> = d
            .adapters
            .iter()
            .map(|a| json!({"name": a.name, "scale": a.scale, "default": a.default}))
            .collect();
        parameters.insert("lora".into(), json!(adapters));
        parameters.insert(
            "default_num_inference_steps".into(),
            json!(spec.defaults.num_inference_steps),
        );
        parameters.insert(
            "max_num_inference_steps".into(),
            json!(spec.limits.max_num_inference_steps),
        );
    }
    parameters
}
