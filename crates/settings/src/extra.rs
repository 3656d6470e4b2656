//! `parameters.extra` of model-settings.json: the generation defaults and limits sections
//! (`defaults`, `limits`), read into the generation crate's types.

use sdserve_generation::{GenerationDefaults, Limits};
use serde_json::{Map, Value};

/// A problem with `parameters.extra` in model-settings.json.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExtraError(pub String);

fn get_usize(
    obj: &Map<String, Value>,
    key: &str,
    section: &str,
) -> Result<Option<usize>, ExtraError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0 && n <= u32::MAX as u64)
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                ExtraError(format!(
                    "parameters.extra.{section}.{key} must be a positive integer, got {v}"
                ))
            }),
    }
}

fn get_f64(obj: &Map<String, Value>, key: &str, section: &str) -> Result<Option<f64>, ExtraError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(Some)
            .ok_or_else(|| {
                ExtraError(format!(
                    "parameters.extra.{section}.{key} must be a non-negative number, got {v}"
                ))
            }),
    }
}

fn section<'a>(
    extra: &'a Map<String, Value>,
    name: &str,
    keys: &[&str],
) -> Result<Option<&'a Map<String, Value>>, ExtraError> {
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str())) {
                return Err(ExtraError(format!(
                    "unknown key parameters.extra.{name}.{k}; allowed: {}",
                    keys.join(", ")
                )));
            }
            Ok(Some(m))
        }
        Some(v) => Err(ExtraError(format!(
            "parameters.extra.{name} must be an object, got {v}"
        ))),
    }
}

/// Keys of `parameters.extra.defaults`.
pub const DEFAULTS_KEYS: &[&str] = &[
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "height",
    "width",
];

/// `parameters.extra.defaults`; what it leaves out keeps [`GenerationDefaults::default`].
pub fn defaults(extra: &Map<String, Value>) -> Result<GenerationDefaults, ExtraError> {
    let mut d = GenerationDefaults::default();
    let Some(m) = section(extra, "defaults", DEFAULTS_KEYS)? else {
        return Ok(d);
    };
    if let Some(n) = get_usize(m, "num_inference_steps", "defaults")? {
        d.num_inference_steps = n;
    }
    if let Some(g) = get_f64(m, "guidance_scale", "defaults")? {
        d.guidance_scale = g;
    }
    d.height = get_usize(m, "height", "defaults")?;
    d.width = get_usize(m, "width", "defaults")?;
    d.scheduler = match m.get("scheduler") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ExtraError(format!(
                "parameters.extra.defaults.scheduler must be a string, got {v}"
            )));
        }
    };
    Ok(d)
}

/// Keys of `parameters.extra.limits`.
pub const LIMITS_KEYS: &[&str] = &[
    "max_num_inference_steps",
    "max_prompts",
    "max_images",
    "max_height",
    "max_width",
    "max_pixels",
    "max_prompt_bytes",
    "max_guidance_scale",
];

/// `parameters.extra.limits`; what it leaves out keeps [`Limits::default`].
pub fn limits(extra: &Map<String, Value>) -> Result<Limits, ExtraError> {
    let mut l = Limits::default();
    let Some(m) = section(extra, "limits", LIMITS_KEYS)? else {
        return Ok(l);
    };
    let fields: [(&str, &mut usize); 7] = [
        ("max_num_inference_steps", &mut l.max_num_inference_steps),
        ("max_prompts", &mut l.max_prompts),
        ("max_images", &mut l.max_images),
        ("max_height", &mut l.max_height),
        ("max_width", &mut l.max_width),
        ("max_pixels", &mut l.max_pixels),
        ("max_prompt_bytes", &mut l.max_prompt_bytes),
    ];
    for (key, slot) in fields {
        if let Some(v) = get_usize(m, key, "limits")? {
            *slot = v;
        }
    }
    if let Some(g) = get_f64(m, "max_guidance_scale", "limits")? {
        l.max_guidance_scale = g;
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_sections_parse_and_reject_typos() {
        let extra = json!({"defaults": {"num_inference_steps": 12, "scheduler": "ddim"},
                           "limits": {"max_num_inference_steps": 50, "max_images": 4}});
        let extra = extra.as_object().unwrap();
        assert_eq!(defaults(extra).unwrap().num_inference_steps, 12);
        assert_eq!(limits(extra).unwrap().max_images, 4);
        let bad = json!({"limits": {"max_step": 5}});
        assert!(
            limits(bad.as_object().unwrap())
                .unwrap_err()
                .0
                .contains("max_step")
        );
        let bad = json!({"defaults": {"num_inference_steps": -3}});
        assert!(defaults(bad.as_object().unwrap()).is_err());
    }
}
