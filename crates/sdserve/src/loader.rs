//! Builds generators: the candle pipeline for every model.

use std::sync::Arc;

use sdserve_engine::{ModelLoader, ModelSpec};
use sdserve_generation::Generator;
use sdserve_pipeline::{LoadOptions, StableDiffusion};

pub struct PipelineLoader;

impl ModelLoader for PipelineLoader {
    fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Generator>, String> {
        let mut options = LoadOptions::from_extra(&spec.extra).map_err(|e| e.to_string())?;
        options.adapters = spec.adapters.clone();
        let model = StableDiffusion::load(&spec.uri, options).map_err(|e| e.to_string())?;
        let description = model.description();
        let schedulers = &description.schedulers;
        if let Some(s) = &spec.defaults.scheduler
            && !schedulers.contains(s)
        {
            return Err(format!(
                "parameters.extra.defaults.scheduler '{s}' is not available; choose one of {}",
                schedulers.join(", ")
            ));
        }
        Ok(Arc::new(model))
    }
}
