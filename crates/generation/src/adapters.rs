//! LoRA adapters as a generation sees them: those a model declares ([`AdapterDeclaration`],
//! from its settings), those it reports ([`AdapterInfo`]), and the set one job runs with
//! ([`AdapterChoice`]), which is a batch setting.

use std::path::PathBuf;

use crate::resolve::ValidationError;

/// Most adapters one request may name.
pub const MAX_ADAPTERS: usize = 8;

/// Largest |scale| a request or a declaration may give.
pub const MAX_SCALE: f64 = 10.0;

/// An adapter declared for a model (`parameters.extra.lora` of its model-settings.json).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterDeclaration {
    pub name: String,
    /// The adapter file (`.safetensors`).
    pub path: PathBuf,
    /// The scale of a request that names the adapter without one, and of the default set.
    pub scale: f64,
    /// Applied to requests that name no adapters.
    pub default: bool,
}

/// An adapter a loaded model serves, as its metadata reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub scale: f64,
    pub default: bool,
}

impl From<&AdapterDeclaration> for AdapterInfo {
    fn from(d: &AdapterDeclaration) -> Self {
        Self {
            name: d.name.clone(),
            scale: d.scale,
            default: d.default,
        }
    }
}

/// The adapters a job runs with and their scales: sorted by name, none at scale 0 (a zero
/// scale changes nothing). Two requests that would give the same images compare equal, so a
/// batch never mixes adapter sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterChoice(Vec<(String, f64)>);

impl AdapterChoice {
    /// No adapters: the base model.
    pub fn none() -> Self {
        Self::default()
    }

    /// `(name, scale)` pairs in name order.
    pub fn entries(&self) -> &[(String, f64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn new(mut entries: Vec<(String, f64)>) -> Self {
        entries.retain(|(_, s)| *s != 0.0);
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self(entries)
    }

    /// The set a request runs with: the named adapters (each declared, within the scale bound,
    /// at most [`MAX_ADAPTERS`]) or, when it names none, the model's defaults.
    pub fn resolve(
        requested: Option<&[(String, Option<f64>)]>,
        declared: &[AdapterInfo],
    ) -> Result<Self, ValidationError> {
        let Some(requested) = requested else {
            let defaults = declared.iter().filter(|a| a.default);
            return Ok(Self::new(
                defaults.map(|a| (a.name.clone(), a.scale)).collect(),
            ));
        };
        if requested.len() > MAX_ADAPTERS {
            return Err(ValidationError(format!(
                "parameter 'lora' names {} adapters; at most {MAX_ADAPTERS} may be combined",
                requested.len()
            )));
        }
        let mut entries = Vec::with_capacity(requested.len());
        for (name, scale) in requested {
            let Some(info) = declared.iter().find(|a| &a.name == name) else {
                let names: Vec<&str> = declared.iter().map(|a| a.name.as_str()).collect();
                return Err(ValidationError(format!(
                    "parameter 'lora': unknown adapter '{name}'; this model has {}",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            };
            if entries.iter().any(|(n, _)| n == name) {
                return Err(ValidationError(format!(
                    "parameter 'lora' names '{name}' twice"
                )));
            }
            let scale = scale.unwrap_or(info.scale);
            if !scale.is_finite() || scale.abs() > MAX_SCALE {
                return Err(ValidationError(format!(
                    "parameter 'lora': the scale of '{name}' is {scale}; it must be between -{MAX_SCALE} and {MAX_SCALE}"
                )));
            }
            entries.push((name.clone(), scale));
        }
        Ok(Self::new(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Vec<AdapterInfo> {
        let info = |name: &str, scale, default| AdapterInfo {
            name: name.into(),
            scale,
            default,
        };
        vec![info("style", 0.8, true), info("detail", 0.5, false)]
    }

    fn named(pairs: &[(&str, Option<f64>)]) -> Vec<(String, Option<f64>)> {
        pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    fn resolve(pairs: &[(&str, Option<f64>)]) -> Result<AdapterChoice, ValidationError> {
        AdapterChoice::resolve(Some(&named(pairs)), &declared())
    }

    #[test]
    fn a_request_naming_none_gets_the_defaults() {
        let choice = AdapterChoice::resolve(None, &declared()).unwrap();
        assert_eq!(choice.entries(), [("style".to_string(), 0.8)]);
        // An empty object is a choice: the base model.
        assert!(resolve(&[]).unwrap().is_empty());
    }

    #[test]
    fn equal_sets_compare_equal_whatever_the_order_and_zero_scales() {
        let a = resolve(&[("style", Some(1.0)), ("detail", Some(0.3))]).unwrap();
        let b = resolve(&[("detail", Some(0.3)), ("style", Some(1.0))]);
        assert_eq!(a, b.unwrap());
        assert_eq!(
            resolve(&[("style", Some(0.0))]).unwrap(),
            AdapterChoice::none()
        );
        assert_ne!(a, resolve(&[("style", Some(1.0))]).unwrap());
        // A missing scale is the declared one.
        assert_eq!(
            resolve(&[("detail", None)]).unwrap().entries(),
            [("detail".to_string(), 0.5)]
        );
    }

    #[test]
    fn unknown_names_bad_scales_and_too_many_are_refused_by_name() {
        let e = resolve(&[("pixel-art", Some(1.0))]).unwrap_err().0;
        assert!(
            e.contains("'lora'") && e.contains("pixel-art") && e.contains("style"),
            "{e}"
        );
        for bad in [f64::NAN, f64::INFINITY, 10.5, -11.0] {
            let e = resolve(&[("style", Some(bad))]).unwrap_err().0;
            assert!(e.contains("'lora'") && e.contains("style"), "{e}");
        }
        let twice = resolve(&[("style", None), ("style", Some(1.0))])
            .unwrap_err()
            .0;
        assert!(twice.contains("twice"), "{twice}");
        let names: Vec<String> = (0..=MAX_ADAPTERS).map(|i| format!("a{i}")).collect();
        let many: Vec<(&str, Option<f64>)> = names.iter().map(|n| (n.as_str(), None)).collect();
        assert!(resolve(&many).unwrap_err().0.contains("at most 8"));
        let e = AdapterChoice::resolve(Some(&named(&[("x", None)])), &[]).unwrap_err();
        assert!(e.0.contains("has none"), "{}", e.0);
    }
}
