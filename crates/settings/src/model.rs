//! Model settings: MLServer 1.7.1's `ModelSettings` and `ModelParameters` as read from a
//! `model-settings.json`, with fields the file does not set taken from `MLSERVER_MODEL_<FIELD>`
//! variables (pydantic-settings does the same for MLServer), then defaults.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::env::Env;
use crate::error::{Origin, SettingsError};
use crate::server::{SettingDoc, SettingKind, nested_env_error};
use crate::value::{Sources, absolute, describe, read_json_object, unknown_key_warnings};

/// File name of a model's settings.
pub const MODEL_SETTINGS_FILE: &str = "model-settings.json";
/// Prefix of every model setting's environment variable (`parameters.*` included).
pub const MODEL_ENV_PREFIX: &str = "MLSERVER_MODEL_";
/// sdserve's own implementation name.
pub const BUILTIN_IMPLEMENTATION: &str = "sdserve.StableDiffusion";

const fn doc(
    key: &'static str,
    env: &'static str,
    default: &'static str,
    kind: SettingKind,
    description: &'static str,
) -> SettingDoc {
    SettingDoc {
        key,
        env,
        flag: None,
        default,
        kind,
        description,
    }
}

use SettingKind::{Ignored, Mlserver};

/// Every model setting (`parameters.*` are keys of the `parameters` object).
pub const MODEL_SETTINGS: &[SettingDoc] = &[
    doc(
        "name",
        "MLSERVER_MODEL_NAME",
        "<folder name>",
        Mlserver,
        "Model name; defaults to the name of the folder holding model-settings.json",
    ),
    doc(
        "implementation",
        "MLSERVER_MODEL_IMPLEMENTATION",
        "(required)",
        Mlserver,
        "\"sdserve.StableDiffusion\", or the Python class path of an MLServer diffusers runtime",
    ),
    doc(
        "platform",
        "MLSERVER_MODEL_PLATFORM",
        "\"\"",
        Mlserver,
        "Reported in model metadata",
    ),
    doc(
        "versions",
        "MLSERVER_MODEL_VERSIONS",
        "[]",
        Mlserver,
        "Reported in model metadata",
    ),
    doc(
        "inputs",
        "MLSERVER_MODEL_INPUTS",
        "[]",
        Ignored,
        "Input tensor metadata; sdserve's metadata always reports the inputs it really accepts",
    ),
    doc(
        "outputs",
        "MLSERVER_MODEL_OUTPUTS",
        "[]",
        Ignored,
        "Output tensor metadata; sdserve's metadata always reports its real output",
    ),
    doc(
        "parallel_workers",
        "MLSERVER_MODEL_PARALLEL_WORKERS",
        "null",
        Ignored,
        "Deprecated in MLServer; use the server setting",
    ),
    doc(
        "warm_workers",
        "MLSERVER_MODEL_WARM_WORKERS",
        "false",
        Ignored,
        "Deprecated in MLServer",
    ),
    doc(
        "max_batch_size",
        "MLSERVER_MODEL_MAX_BATCH_SIZE",
        "0",
        Mlserver,
        "Adaptive batching: most images generated together (requests with the same size, steps, scheduler and guidance share a batch); batching needs > 1",
    ),
    doc(
        "max_batch_time",
        "MLSERVER_MODEL_MAX_BATCH_TIME",
        "0",
        Mlserver,
        "Adaptive batching: seconds to wait for a batch to fill (batching needs > 0)",
    ),
    doc(
        "cache_enabled",
        "MLSERVER_MODEL_CACHE_ENABLED",
        "false",
        Ignored,
        "Per-model response cache",
    ),
    doc(
        "parameters",
        "MLSERVER_MODEL_PARAMETERS",
        "{}",
        Mlserver,
        "Object with the keys below",
    ),
    doc(
        "parameters.uri",
        "MLSERVER_MODEL_URI",
        "<folder>",
        Mlserver,
        "The diffusers model folder; relative to model-settings.json's folder",
    ),
    doc(
        "parameters.version",
        "MLSERVER_MODEL_VERSION",
        "null",
        Mlserver,
        "Model version (routes /v2/models/{name}/versions/{version}/...)",
    ),
    doc(
        "parameters.content_type",
        "MLSERVER_MODEL_CONTENT_TYPE",
        "null",
        Mlserver,
        "Default request content type (reported in metadata)",
    ),
    doc(
        "parameters.format",
        "MLSERVER_MODEL_FORMAT",
        "null",
        Ignored,
        "Runtime-specific model format (sdserve reads diffusers folders)",
    ),
    doc(
        "parameters.environment_path",
        "MLSERVER_MODEL_ENVIRONMENT_PATH",
        "null",
        Ignored,
        "MLServer per-model Python environment",
    ),
    doc(
        "parameters.environment_tarball",
        "MLSERVER_MODEL_ENVIRONMENT_TARBALL",
        "null",
        Ignored,
        "MLServer per-model Python environment tarball",
    ),
    doc(
        "parameters.inference_pool_gid",
        "MLSERVER_MODEL_INFERENCE_POOL_GID",
        "null",
        Ignored,
        "MLServer inference pool group",
    ),
    doc(
        "parameters.autogenerate_inference_pool_gid",
        "MLSERVER_MODEL_AUTOGENERATE_INFERENCE_POOL_GID",
        "false",
        Ignored,
        "MLServer inference pool group",
    ),
    doc(
        "parameters.extra",
        "MLSERVER_MODEL_EXTRA",
        "{}",
        Mlserver,
        "Runtime settings: generation defaults and bounds, dtype, device, LoRA adapters",
    ),
];

fn known_keys(in_parameters: bool) -> Vec<&'static str> {
    MODEL_SETTINGS
        .iter()
        .filter_map(
            |d| match (in_parameters, d.key.strip_prefix("parameters.")) {
                (true, Some(k)) => Some(k),
                (false, None) => Some(d.key),
                _ => None,
            },
        )
        .collect()
}

/// The `implementation` of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Implementation {
    /// `"sdserve.StableDiffusion"` (or `"sdserve"`).
    Builtin(String),
    /// The Python class path of an MLServer runtime (e.g. a custom diffusers runtime), served by
    /// the built-in pipeline.
    PythonClass(String),
}

/// MLServer runtimes that serve other kinds of models, with what they are.
const OTHER_RUNTIMES: &[(&str, &str)] = &[
    ("mlserver_sklearn", "is MLServer's scikit-learn runtime"),
    ("mlserver_xgboost", "is MLServer's XGBoost runtime"),
    ("mlserver_lightgbm", "is MLServer's LightGBM runtime"),
    ("mlserver_mlflow", "is MLServer's MLflow runtime"),
    (
        "mlserver_huggingface",
        "is MLServer's HuggingFace runtime, which serves transformers pipelines only (no diffusers)",
    ),
    (
        "mlserver_alibi_explain",
        "is MLServer's Alibi Explain runtime",
    ),
    (
        "mlserver_alibi_detect",
        "is MLServer's Alibi Detect runtime",
    ),
    ("mlserver_catboost", "is MLServer's CatBoost runtime"),
    ("mlserver_onnx", "is MLServer's ONNX runtime"),
    ("mlserver_mllib", "is MLServer's Spark MLlib runtime"),
    (
        "mlserver",
        "is part of MLServer itself, not a model runtime",
    ),
];

const USE_BUILTIN: &str =
    "sdserve serves Stable Diffusion (diffusers) models only; use \"sdserve.StableDiffusion\"";

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Implementation {
    /// Classifies an `implementation` value; the error is the reason it is refused.
    pub fn parse(value: &str) -> Result<Implementation, String> {
        if value == "sdserve" || value == BUILTIN_IMPLEMENTATION {
            return Ok(Implementation::Builtin(value.to_string()));
        }
        let parts: Vec<&str> = value.split('.').collect();
        if parts.len() < 2 || !parts.iter().all(|p| is_identifier(p)) {
            return Err(format!(
                "is not a Python class path (like \"runtime.StableDiffusionRuntime\"); \
                 {USE_BUILTIN}"
            ));
        }
        if parts[0] == "sdserve" {
            return Err(format!(
                "is not an sdserve implementation; the built-in one is \"{BUILTIN_IMPLEMENTATION}\""
            ));
        }
        if let Some((_, what)) = OTHER_RUNTIMES
            .iter()
            .find(|(module, _)| *module == parts[0])
        {
            return Err(format!("{what}; {USE_BUILTIN}"));
        }
        let class = parts[parts.len() - 1];
        if !class.starts_with(|c: char| c.is_ascii_uppercase()) {
            return Err(format!(
                "does not end in a class name (like \"runtime.StableDiffusionRuntime\"); \
                 {USE_BUILTIN}"
            ));
        }
        Ok(Implementation::PythonClass(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Implementation::Builtin(s) | Implementation::PythonClass(s) => s,
        }
    }

    pub fn is_builtin(&self) -> bool {
        matches!(self, Implementation::Builtin(_))
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Implementation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `parameters` of a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelParameters {
    /// The model folder, absolute (a relative `uri` is resolved against the folder of
    /// model-settings.json; `file:` URIs are accepted).
    pub uri: PathBuf,
    /// `None` for an unversioned model (an empty string counts as none, as in MLServer).
    pub version: Option<String>,
    pub content_type: Option<String>,
    pub format: Option<String>,
    pub environment_path: Option<String>,
    pub environment_tarball: Option<String>,
    pub inference_pool_gid: Option<String>,
    pub autogenerate_inference_pool_gid: bool,
    /// Runtime settings, interpreted by the pipeline.
    pub extra: Map<String, Value>,
    /// Other keys of `parameters` (MLServer allows any); sdserve does not use them.
    pub other: Map<String, Value>,
}

/// Settings of one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSettings {
    pub name: String,
    pub implementation: Implementation,
    pub platform: String,
    pub versions: Vec<String>,
    /// `MetadataTensor` objects (`name`, `datatype`, `shape`, optional `parameters`).
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    pub max_batch_size: usize,
    /// Seconds.
    pub max_batch_time: f64,
    /// Deprecated in MLServer; ignored.
    pub parallel_workers: Option<i64>,
    /// Deprecated in MLServer; ignored.
    pub warm_workers: bool,
    pub cache_enabled: bool,
    pub parameters: ModelParameters,
    /// The model-settings.json it came from; `None` for a model from `MLSERVER_MODEL_*`.
    pub settings_file: Option<PathBuf>,
}

impl ModelSettings {
    pub fn version(&self) -> Option<&str> {
        self.parameters.version.as_deref()
    }

    /// The model folder.
    pub fn uri(&self) -> &Path {
        &self.parameters.uri
    }

    /// Where the settings came from, for messages.
    pub fn origin(&self) -> Origin {
        match &self.settings_file {
            Some(path) => Origin::File(path.clone()),
            None => Origin::Environment,
        }
    }

    /// Reads one `model-settings.json` (an absolute path). The name defaults to the folder's
    /// name and the uri to the folder.
    pub fn from_file(
        path: &Path,
        env: &Env,
        warnings: &mut Vec<String>,
        notes: &mut Vec<String>,
    ) -> Result<ModelSettings, SettingsError> {
        let obj = read_json_object(path)?;
        let folder = path.parent().unwrap_or(Path::new("/"));
        let folder_name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ctx = Context {
            origin: Origin::File(path.to_path_buf()),
            folder_name,
            default_uri: folder.to_path_buf(),
            uri_base: folder.to_path_buf(),
        };
        parse(Some(&obj), &ctx, env, warnings, notes)
    }

    /// The model described only by `MLSERVER_MODEL_*` variables, for a repository without any
    /// model-settings.json. Its name defaults to the repository folder's name and its uri to the
    /// repository folder; a relative `MLSERVER_MODEL_URI` is relative to the working directory,
    /// as in MLServer.
    pub fn from_env(
        root: &Path,
        env: &Env,
        warnings: &mut Vec<String>,
        notes: &mut Vec<String>,
    ) -> Result<ModelSettings, SettingsError> {
        let ctx = Context {
            origin: Origin::Environment,
            folder_name: root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            default_uri: root.to_path_buf(),
            uri_base: env.cwd().to_path_buf(),
        };
        parse(None, &ctx, env, warnings, notes)
    }
}

struct Context {
    origin: Origin,
    folder_name: String,
    default_uri: PathBuf,
    uri_base: PathBuf,
}

fn check_seconds(secs: &f64) -> Result<(), String> {
    if secs.is_finite() && *secs >= 0.0 {
        Ok(())
    } else {
        Err("must be a number of seconds, 0 or more".into())
    }
}

/// `MetadataTensor` lists: objects with a string `name` and `datatype` and an integer `shape`.
#[allow(clippy::ptr_arg)] // used as `Fn(&T)` by `Sources::get_checked`
fn check_tensors(items: &Vec<Value>) -> Result<(), String> {
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(format!("item {i}: expected an object, {}", describe(item)));
        };
        for key in ["name", "datatype"] {
            match obj.get(key) {
                Some(Value::String(_)) => {}
                Some(other) => {
                    return Err(format!(
                        "item {i}: `{key}`: expected a string, {}",
                        describe(other)
                    ));
                }
                None => return Err(format!("item {i}: `{key}` is required")),
            }
        }
        match obj.get("shape") {
            Some(Value::Array(dims)) if dims.iter().all(|d| d.is_i64()) => {}
            Some(other) => {
                return Err(format!(
                    "item {i}: `shape`: expected a list of integers, {}",
                    describe(other)
                ));
            }
            None => return Err(format!("item {i}: `shape` is required")),
        }
        match obj.get("parameters") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(format!(
                    "item {i}: `parameters`: expected an object, {}",
                    describe(other)
                ));
            }
        }
    }
    Ok(())
}

fn has_url_scheme(uri: &str) -> Option<&str> {
    let (scheme, _) = uri.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = scheme.len() > 1
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// A local path from a `uri`: plain paths and `file:` URIs; other schemes are refused because
/// sdserve loads models from local folders only.
fn resolve_uri(uri: &str, base: &Path) -> Result<PathBuf, String> {
    let path = match has_url_scheme(uri) {
        Some(scheme) if scheme.eq_ignore_ascii_case("file") => {
            let rest = &uri[scheme.len() + 1..];
            match rest.strip_prefix("//") {
                // file://host/path: the host is ignored, as MLServer does.
                Some(authority_and_path) => match authority_and_path.find('/') {
                    Some(i) => &authority_and_path[i..],
                    None => "",
                },
                None => rest,
            }
        }
        Some(scheme) => {
            return Err(format!(
                "{uri:?}: only local folders are supported, not {scheme}: URIs \
                 (download the model first)"
            ));
        }
        None => uri,
    };
    if path.is_empty() {
        return Err(format!("{uri:?} has no path"));
    }
    Ok(absolute(base, Path::new(path)))
}

/// `implementation`: required, and one sdserve serves.
fn implementation(src: &Sources<'_>, origin: &Origin) -> Result<Implementation, SettingsError> {
    let text: String =
        src.get("implementation")?
            .ok_or_else(|| SettingsError::MissingImplementation {
                origin: origin.clone(),
            })?;
    Implementation::parse(&text).map_err(|reason| SettingsError::UnsupportedImplementation {
        origin: origin.clone(),
        value: text.clone(),
        reason,
    })
}

/// The model's name: as given (a warning when it is not its folder's name or version), else
/// its folder's name.
fn model_name(
    explicit: Option<String>,
    version: Option<&str>,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> Result<String, SettingsError> {
    let origin = &ctx.origin;
    let name = match explicit {
        Some(name) => {
            let matches_folder =
                name == ctx.folder_name || version == Some(ctx.folder_name.as_str());
            if !matches_folder && matches!(origin, Origin::File(_)) {
                warnings.push(format!(
                    "{origin}: model name {name:?} is different from its folder's name {:?}",
                    ctx.folder_name
                ));
            }
            name
        }
        None if ctx.folder_name.is_empty() => {
            return Err(SettingsError::InvalidValue {
                origin: origin.clone(),
                key: "name".into(),
                message: "no name given and none can be taken from the folder".into(),
            });
        }
        None => ctx.folder_name.clone(),
    };
    if name.contains('/') {
        warnings.push(format!(
            "{origin}: model name {name:?} contains '/', so its routes cannot be addressed"
        ));
    }
    Ok(name)
}

fn parse(
    obj: Option<&Map<String, Value>>,
    ctx: &Context,
    env: &Env,
    warnings: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<ModelSettings, SettingsError> {
    let origin = &ctx.origin;
    if let Some(obj) = obj {
        unknown_key_warnings(obj, &known_keys(false), origin, "", warnings);
    }
    let src = Sources {
        obj,
        origin,
        key_prefix: "",
        env,
        env_prefix: MODEL_ENV_PREFIX,
    };

    let implementation = implementation(&src, origin)?;
    let explicit_name = src.get::<String>("name")?.filter(|n| !n.is_empty());
    let parameters = parse_parameters(&src, ctx, warnings)?;
    let name = model_name(explicit_name, parameters.version.as_deref(), ctx, warnings)?;

    if let Implementation::PythonClass(class) = &implementation {
        notes.push(format!(
            "model {name:?} ({origin}): implementation {class:?} is served by sdserve's built-in \
             diffusers pipeline"
        ));
    }

    let settings = ModelSettings {
        name,
        implementation,
        platform: src.get("platform")?.unwrap_or_default(),
        versions: src.get("versions")?.unwrap_or_default(),
        inputs: src
            .get_checked("inputs", check_tensors)?
            .unwrap_or_default(),
        outputs: src
            .get_checked("outputs", check_tensors)?
            .unwrap_or_default(),
        max_batch_size: src.get("max_batch_size")?.unwrap_or(0),
        max_batch_time: src
            .get_checked("max_batch_time", check_seconds)?
            .unwrap_or(0.0),
        parallel_workers: src.get::<Option<i64>>("parallel_workers")?.flatten(),
        warm_workers: src.get("warm_workers")?.unwrap_or(false),
        cache_enabled: src.get("cache_enabled")?.unwrap_or(false),
        parameters,
        settings_file: match origin {
            Origin::File(path) => Some(path.clone()),
            Origin::Environment => None,
        },
    };
    unsupported_model_warnings(&settings, origin, warnings);
    Ok(settings)
}

fn parse_parameters(
    src: &Sources<'_>,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> Result<ModelParameters, SettingsError> {
    let origin = &ctx.origin;
    let from_obj =
        |obj: Option<&Map<String, Value>>, origin: &Origin, warnings: &mut Vec<String>| {
            let inner = Sources {
                obj,
                origin,
                key_prefix: "parameters.",
                env: src.env,
                env_prefix: MODEL_ENV_PREFIX,
            };
            parameters_from(&inner, ctx, warnings)
        };
    match src.obj.and_then(|o| o.get("parameters")) {
        Some(Value::Object(obj)) => from_obj(Some(obj), origin, warnings),
        Some(Value::Null) => from_obj(None, origin, warnings),
        Some(other) => Err(SettingsError::InvalidValue {
            origin: origin.clone(),
            key: "parameters".into(),
            message: format!("expected an object, {}", describe(other)),
        }),
        None => {
            let var = src.env_var("parameters");
            match src.env.get(&var) {
                None => from_obj(None, origin, warnings),
                Some(text) => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(obj)) => {
                        let env_origin = Origin::File(PathBuf::from(&var));
                        from_obj(Some(&obj), &env_origin, warnings)
                            .map_err(|e| nested_env_error(&var, text, e))
                    }
                    Ok(Value::Null) => from_obj(None, origin, warnings),
                    Ok(other) => Err(SettingsError::InvalidEnv {
                        var: var.clone(),
                        value: text.to_string(),
                        message: format!("expected a JSON object, {}", describe(&other)),
                    }),
                    Err(e) => Err(SettingsError::InvalidEnv {
                        var: var.clone(),
                        value: text.to_string(),
                        message: format!("expected a JSON object: {e}"),
                    }),
                },
            }
        }
    }
}

fn parameters_from(
    src: &Sources<'_>,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> Result<ModelParameters, SettingsError> {
    let known = known_keys(true);
    let mut other = Map::new();
    if let Some(obj) = src.obj {
        for (k, v) in obj {
            if !known.contains(&k.as_str()) {
                warnings.push(format!(
                    "{}: `parameters.{k}` is not used by sdserve (kept as an extra parameter)",
                    src.origin
                ));
                other.insert(k.clone(), v.clone());
            }
        }
    }
    // Where a uri is relative to: the settings file's folder, or for the environment the
    // working directory. A uri from a variable still resolves against the file's folder when
    // the model has a file, as MLServer's get_model_uri does.
    let uri = match src
        .get::<Option<String>>("uri")?
        .flatten()
        .filter(|u| !u.is_empty())
    {
        None => ctx.default_uri.clone(),
        Some(uri) => resolve_uri(&uri, &ctx.uri_base).map_err(|message| {
            if src.obj.is_some_and(|o| o.contains_key("uri")) {
                SettingsError::InvalidValue {
                    origin: src.origin.clone(),
                    key: "parameters.uri".into(),
                    message,
                }
            } else {
                SettingsError::InvalidEnv {
                    var: src.env_var("uri"),
                    value: uri.clone(),
                    message,
                }
            }
        })?,
    };
    Ok(ModelParameters {
        uri,
        version: src
            .get::<Option<String>>("version")?
            .flatten()
            .filter(|v| !v.is_empty()),
        content_type: src.get::<Option<String>>("content_type")?.flatten(),
        format: src.get::<Option<String>>("format")?.flatten(),
        environment_path: src.get::<Option<String>>("environment_path")?.flatten(),
        environment_tarball: src.get::<Option<String>>("environment_tarball")?.flatten(),
        inference_pool_gid: src.get::<Option<String>>("inference_pool_gid")?.flatten(),
        autogenerate_inference_pool_gid: src
            .get("autogenerate_inference_pool_gid")?
            .unwrap_or(false),
        extra: src
            .get::<Option<Map<String, Value>>>("extra")?
            .flatten()
            .unwrap_or_default(),
        other,
    })
}

fn unsupported_model_warnings(m: &ModelSettings, origin: &Origin, warnings: &mut Vec<String>) {
    let mut warn = |key: &str, value: String, why: &str| {
        warnings.push(format!(
            "{origin}: `{key}` = {value} is accepted but {why}; it has no effect"
        ));
    };
    if let Some(n) = m.parallel_workers {
        warn(
            "parallel_workers",
            n.to_string(),
            "deprecated (use the server setting `parallel_workers`)",
        );
    }
    if m.warm_workers {
        warn("warm_workers", "true".into(), "deprecated");
    }
    if m.cache_enabled {
        warn("cache_enabled", "true".into(), "not supported by sdserve");
    }
    let p = &m.parameters;
    for (key, value) in [
        ("parameters.environment_path", &p.environment_path),
        ("parameters.environment_tarball", &p.environment_tarball),
        ("parameters.inference_pool_gid", &p.inference_pool_gid),
    ] {
        if let Some(v) = value {
            warn(
                key,
                format!("{v:?}"),
                "not supported by sdserve (it runs no Python)",
            );
        }
    }
    if p.autogenerate_inference_pool_gid {
        warn(
            "parameters.autogenerate_inference_pool_gid",
            "true".into(),
            "not supported by sdserve",
        );
    }
}

/// Reads `path` (a model-settings.json) as JSON only, to learn the name it declares, if any.
pub(crate) fn declared_name(path: &Path) -> Option<String> {
    let obj = read_json_object(path).ok()?;
    match obj.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_and_python_class_paths_are_accepted() {
        for ok in ["sdserve", "sdserve.StableDiffusion"] {
            assert!(Implementation::parse(ok).unwrap().is_builtin(), "{ok}");
        }
        for ok in [
            "runtime.StableDiffusionRuntime",
            "models.DiffusersModel",
            "mlserver_diffusers.StableDiffusion",
            "my_pkg.sub.module.SDModel",
            "_private.Model",
        ] {
            assert_eq!(
                Implementation::parse(ok).unwrap(),
                Implementation::PythonClass(ok.to_string()),
                "{ok}"
            );
        }
    }

    #[test]
    fn other_runtimes_and_non_paths_are_refused() {
        let refused = [
            ("mlserver_sklearn.SKLearnModel", "scikit-learn"),
            ("mlserver_xgboost.XGBoostModel", "XGBoost"),
            ("mlserver_lightgbm.LightGBMModel", "LightGBM"),
            ("mlserver_mlflow.MLflowRuntime", "MLflow"),
            (
                "mlserver_huggingface.HuggingFaceRuntime",
                "transformers pipelines only",
            ),
            (
                "mlserver_alibi_explain.AlibiExplainRuntime",
                "Alibi Explain",
            ),
            ("mlserver_alibi_detect.AlibiDetectRuntime", "Alibi Detect"),
            ("mlserver_catboost.CatboostModel", "CatBoost"),
            ("mlserver_onnx.OnnxModel", "ONNX"),
            ("mlserver_mllib.MLlibModel", "MLlib"),
            ("mlserver.MLModel", "MLServer itself"),
            ("StableDiffusion", "not a Python class path"),
            ("runtime.", "not a Python class path"),
            ("run time.Model", "not a Python class path"),
            ("runtime.load", "class name"),
            ("sdserve.Other", "sdserve.StableDiffusion"),
            ("", "not a Python class path"),
            ("../x.Y", "not a Python class path"),
        ];
        for (value, expected) in refused {
            let reason = Implementation::parse(value).unwrap_err();
            assert!(reason.contains(expected), "{value}: {reason}");
        }
    }

    #[test]
    fn uri_resolution() {
        let base = Path::new("/repo/sd");
        assert_eq!(
            resolve_uri("weights", base).unwrap(),
            PathBuf::from("/repo/sd/weights")
        );
        assert_eq!(
            resolve_uri("../shared", base).unwrap(),
            PathBuf::from("/repo/shared")
        );
        assert_eq!(
            resolve_uri("/abs/m", base).unwrap(),
            PathBuf::from("/abs/m")
        );
        assert_eq!(
            resolve_uri("file:///abs/m", base).unwrap(),
            PathBuf::from("/abs/m")
        );
        assert_eq!(
            resolve_uri("file://host/abs/m", base).unwrap(),
            PathBuf::from("/abs/m")
        );
        assert_eq!(
            resolve_uri("file:rel", base).unwrap(),
            PathBuf::from("/repo/sd/rel")
        );
        assert!(
            resolve_uri("s3://bucket/m", base)
                .unwrap_err()
                .contains("s3:")
        );
        assert!(resolve_uri("gs://bucket/m", base).is_err());
    }

    #[test]
    fn tensors_are_checked() {
        use serde_json::json;
        assert!(
            check_tensors(&vec![
                json!({"name": "prompt", "datatype": "BYTES", "shape": [-1]})
            ])
            .is_ok()
        );
        assert!(
            check_tensors(&vec![json!({"name": "prompt", "shape": [1]})])
                .unwrap_err()
                .contains("`datatype` is required")
        );
        assert!(
            check_tensors(&vec![
                json!({"name": "p", "datatype": "BYTES", "shape": ["a"]})
            ])
            .unwrap_err()
            .contains("`shape`")
        );
        assert!(check_tensors(&vec![json!(3)]).is_err());
    }

    #[test]
    fn table_keys_are_consistent() {
        for d in MODEL_SETTINGS {
            let field = d.key.strip_prefix("parameters.").unwrap_or(d.key);
            assert_eq!(
                d.env,
                format!("MLSERVER_MODEL_{}", field.to_ascii_uppercase())
            );
            assert!(d.flag.is_none());
        }
    }
}
