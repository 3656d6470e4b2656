//! Model settings (as MLServer reads them) → the engine's model spec.

use std::time::Duration;

use sdserve_engine::ModelSpec;
use sdserve_settings::ModelSettings;

/// Top-level keys of `parameters.extra` that sdserve understands.
const EXTRA_KEYS: &[&str] = &["device", "dtype", "defaults", "limits", "lora"];

pub fn to_spec(m: &ModelSettings) -> Result<ModelSpec, String> {
    let origin = m.origin();
    let fail = |e: String| format!("model {}: {origin}: {e}", m.name);
    if let Some(k) = m
        .parameters
        .extra
        .keys()
        .find(|k| !EXTRA_KEYS.contains(&k.as_str()))
    {
        return Err(fail(format!(
            "unknown key parameters.extra.{k}; allowed: {}",
            EXTRA_KEYS.join(", ")
        )));
    }
    let defaults = sdserve_settings::extra::defaults(&m.parameters.extra).map_err(|e| fail(e.0))?;
    let limits = sdserve_settings::extra::limits(&m.parameters.extra).map_err(|e| fail(e.0))?;
    // Adapter paths are relative to the settings file (the model folder without one).
    let base = m
        .settings_file
        .as_deref()
        .and_then(|f| f.parent())
        .unwrap_or(m.uri());
    let adapters =
        sdserve_settings::extra::lora(&m.parameters.extra, base).map_err(|e| fail(e.0))?;
    if !m.max_batch_time.is_finite() || m.max_batch_time < 0.0 || m.max_batch_time > 3600.0 {
        return Err(fail(format!(
            "max_batch_time must be between 0 and 3600 seconds, got {}",
            m.max_batch_time
        )));
    }
    Ok(ModelSpec {
        name: m.name.clone(),
        version: m.version().map(str::to_owned),
        uri: m.uri().to_path_buf(),
        extra: m.parameters.extra.clone(),
        platform: m.platform.clone(),
        versions: m.versions.clone(),
        content_type: m.parameters.content_type.clone(),
        max_batch_size: m.max_batch_size,
        max_batch_time: Duration::from_secs_f64(m.max_batch_time),
        defaults,
        limits,
        adapters,
    })
}
