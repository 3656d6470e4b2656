//! `parameters.extra` of model-settings.json: the generation defaults and limits sections
//! (`defaults`, `limits`) and the LoRA adapters (`lora`), read into the generation crate's
//! types.

use std::path::Path;

use sdserve_generation::adapters::{MAX_ADAPTERS, MAX_SCALE};
use sdserve_generation::{AdapterDeclaration, GenerationDefaults, Limits};
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

/// Keys of one adapter in `parameters.extra.lora`.
pub const LORA_KEYS: &[&str] = &["path", "scale", "default"];

/// Most adapters one model may declare.
pub const MAX_DECLARED_ADAPTERS: usize = 64;

/// `parameters.extra.lora`: adapter name → `{"path", "scale" (1.0), "default" (false)}`, or
/// the path alone; a relative path is relative to `base` (the settings file's folder).
pub fn lora(
    extra: &Map<String, Value>,
    base: &Path,
) -> Result<Vec<AdapterDeclaration>, ExtraError> {
    let adapters = match extra.get("lora") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(ExtraError(format!(
                "parameters.extra.lora must be an object of adapter names, got {v}"
            )));
        }
    };
    if adapters.len() > MAX_DECLARED_ADAPTERS {
        return Err(ExtraError(format!(
            "parameters.extra.lora declares {} adapters; at most {MAX_DECLARED_ADAPTERS}",
            adapters.len()
        )));
    }
    let declared: Vec<AdapterDeclaration> = adapters
        .iter()
        .map(|(name, v)| adapter(name, v, base))
        .collect::<Result<_, _>>()?;
    // The defaults are what a request naming none gets: held to a request's bound.
    let defaults = declared.iter().filter(|a| a.default).count();
    if defaults > MAX_ADAPTERS {
        return Err(ExtraError(format!(
            "parameters.extra.lora makes {defaults} adapters default; at most {MAX_ADAPTERS} apply to one request"
        )));
    }
    Ok(declared)
}

fn adapter(name: &str, v: &Value, base: &Path) -> Result<AdapterDeclaration, ExtraError> {
    let at = format!("parameters.extra.lora.{name}");
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !name_ok {
        return Err(ExtraError(format!(
            "{at}: an adapter name is 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    let owned;
    let m = match v {
        Value::String(_) => {
            owned = Map::from_iter([("path".to_string(), v.clone())]);
            &owned
        }
        Value::Object(m) => m,
        _ => {
            return Err(ExtraError(format!(
                "{at} must be an object with a path (or the path alone), got {v}"
            )));
        }
    };
    if let Some(k) = m.keys().find(|k| !LORA_KEYS.contains(&k.as_str())) {
        return Err(ExtraError(format!(
            "unknown key {at}.{k}; allowed: {}",
            LORA_KEYS.join(", ")
        )));
    }
    let path = match m.get("path") {
        Some(Value::String(p)) if !p.is_empty() => base.join(p),
        other => {
            return Err(ExtraError(format!(
                "{at}.path must be the adapter file's path, got {}",
                other.unwrap_or(&Value::Null)
            )));
        }
    };
    let scale = match m.get("scale") {
        None | Some(Value::Null) => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && s.abs() <= MAX_SCALE)
            .ok_or_else(|| {
                ExtraError(format!(
                    "{at}.scale must be a number between -{MAX_SCALE} and {MAX_SCALE}, got {v}"
                ))
            })?,
    };
    let default = match m.get("default") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ExtraError(format!(
                "{at}.default must be true or false, got {v}"
            )));
        }
    };
    Ok(AdapterDeclaration {
        name: name.to_string(),
        path,
        scale,
        default,
    })
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

    #[test]
    fn lora_declarations_resolve_paths_and_name_every_bad_key() {
        let base = Path::new("/models/sd");
        let extra = json!({"lora": {
            "style": {"path": "lora/style.safetensors", "scale": 0.8, "default": true},
            "detail": "/adapters/detail.safetensors"}});
        let mut got = lora(extra.as_object().unwrap(), base).unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got[0].path, Path::new("/adapters/detail.safetensors"));
        assert_eq!((got[0].scale, got[0].default), (1.0, false));
        assert_eq!(got[1].path, Path::new("/models/sd/lora/style.safetensors"));
        assert_eq!((got[1].scale, got[1].default), (0.8, true));
        assert!(lora(&Map::new(), base).unwrap().is_empty());
        for (bad, needle) in [
            (
                json!({"lora": ["style"]}),
                "parameters.extra.lora must be an object",
            ),
            (
                json!({"lora": {"a b": "x.safetensors"}}),
                "parameters.extra.lora.a b",
            ),
            (
                json!({"lora": {"s": {"path": "x", "weight": 1}}}),
                "parameters.extra.lora.s.weight",
            ),
            (
                json!({"lora": {"s": {"scale": 1}}}),
                "parameters.extra.lora.s.path",
            ),
            (
                json!({"lora": {"s": {"path": "x", "scale": 11}}}),
                "parameters.extra.lora.s.scale",
            ),
            (
                json!({"lora": {"s": {"path": "x", "default": 1}}}),
                "parameters.extra.lora.s.default",
            ),
            (
                json!({"lora": {"s": 3}}),
                "parameters.extra.lora.s must be an object",
            ),
            (
                json!({"lora": (0..9)
                    .map(|i| (format!("a{i}"), json!({"path": "x", "default": true})))
                    .collect::<Map<String, Value>>()}),
                "at most 8 apply",
            ),
        ] {
            let err = lora(bad.as_object().unwrap(), base).unwrap_err().0;
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }
}
