//! Server settings: MLServer 1.7.1's `Settings` (same keys, same defaults, `MLSERVER_<KEY>`
//! variables) plus sdserve's own limits. Precedence: command-line flag > `settings.json` >
//! `MLSERVER_*` variable > default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::env::Env;
use crate::error::{Origin, SettingsError};
use crate::memory_budget::MemoryBudgetSetting;
use crate::value::{Sources, describe, read_json_object, unknown_key_warnings};

/// File name of the server settings inside the model repository.
pub const SETTINGS_FILE: &str = "settings.json";
/// Prefix of every server setting's environment variable.
pub const ENV_PREFIX: &str = "MLSERVER_";

/// The version sdserve reports as `server_version`.
pub const SDSERVE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How sdserve treats a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// An MLServer setting sdserve honours.
    Mlserver,
    /// An sdserve setting MLServer does not have.
    Sdserve,
    /// An MLServer setting sdserve accepts but does not implement: a warning names it when it is
    /// set to anything but its default.
    Ignored,
}

/// One row of the settings reference (`--help`, README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    /// Key in the JSON file.
    pub key: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// Command-line flag of `sdserve start`, if any.
    pub flag: Option<&'static str>,
    /// Default, as text (strings bare, `""` for the empty string).
    pub default: &'static str,
    pub kind: SettingKind,
    pub description: &'static str,
}

const fn doc(
    key: &'static str,
    env: &'static str,
    flag: Option<&'static str>,
    default: &'static str,
    kind: SettingKind,
    description: &'static str,
) -> SettingDoc {
    SettingDoc {
        key,
        env,
        flag,
        default,
        kind,
        description,
    }
}

use SettingKind::{Ignored, Mlserver, Sdserve};

/// Every server setting, in MLServer's order, then sdserve's own.
pub const SERVER_SETTINGS: &[SettingDoc] = &[
    doc(
        "debug",
        "MLSERVER_DEBUG",
        Some("--debug"),
        "true",
        Mlserver,
        "Debug mode: access logs and debug-level logging (MLServer 1.7.1's default is true)",
    ),
    doc(
        "parallel_workers",
        "MLSERVER_PARALLEL_WORKERS",
        Some("--parallel-workers"),
        "1",
        Mlserver,
        "Number of inference workers",
    ),
    doc(
        "parallel_workers_timeout",
        "MLSERVER_PARALLEL_WORKERS_TIMEOUT",
        None,
        "5",
        Ignored,
        "Seconds MLServer waits for each worker process at shutdown (sdserve drains with drain_timeout)",
    ),
    doc(
        "environments_dir",
        "MLSERVER_ENVIRONMENTS_DIR",
        None,
        "<cwd>/.envs",
        Ignored,
        "Folder where MLServer unpacks per-model Python environments",
    ),
    doc(
        "model_repository_implementation",
        "MLSERVER_MODEL_REPOSITORY_IMPLEMENTATION",
        None,
        "null",
        Ignored,
        "Python class of a custom model repository",
    ),
    doc(
        "model_repository_root",
        "MLSERVER_MODEL_REPOSITORY_ROOT",
        None,
        ".",
        Mlserver,
        "Model repository folder; replaced by the folder given to `sdserve start`",
    ),
    doc(
        "model_repository_implementation_args",
        "MLSERVER_MODEL_REPOSITORY_IMPLEMENTATION_ARGS",
        None,
        "{}",
        Ignored,
        "Arguments of a custom model repository",
    ),
    doc(
        "load_models_at_startup",
        "MLSERVER_LOAD_MODELS_AT_STARTUP",
        Some("--load-models-at-startup"),
        "true",
        Mlserver,
        "Load every model of the repository at startup (else only through the repository API)",
    ),
    doc(
        "server_name",
        "MLSERVER_SERVER_NAME",
        None,
        "mlserver",
        Mlserver,
        "Server name reported by GET /v2",
    ),
    doc(
        "server_version",
        "MLSERVER_SERVER_VERSION",
        None,
        SDSERVE_VERSION,
        Mlserver,
        "Server version reported by GET /v2",
    ),
    doc(
        "extensions",
        "MLSERVER_EXTENSIONS",
        None,
        "[]",
        Mlserver,
        "Extensions reported by GET /v2",
    ),
    doc(
        "host",
        "MLSERVER_HOST",
        Some("--host"),
        "0.0.0.0",
        Mlserver,
        "Address the HTTP, gRPC and metrics listeners bind to",
    ),
    doc(
        "http_port",
        "MLSERVER_HTTP_PORT",
        Some("--http-port"),
        "8080",
        Mlserver,
        "Port of the HTTP (REST) listener",
    ),
    doc(
        "root_path",
        "MLSERVER_ROOT_PATH",
        None,
        "\"\"",
        Ignored,
        "Path prefix the server is mounted under behind a proxy (ASGI root_path)",
    ),
    doc(
        "grpc_port",
        "MLSERVER_GRPC_PORT",
        Some("--grpc-port"),
        "8081",
        Mlserver,
        "Port of the gRPC listener",
    ),
    doc(
        "grpc_max_message_length",
        "MLSERVER_GRPC_MAX_MESSAGE_LENGTH",
        None,
        "null",
        Mlserver,
        "Largest gRPC message in bytes (null: the gRPC default)",
    ),
    doc(
        "cors_settings",
        "MLSERVER_CORS_SETTINGS",
        None,
        "null",
        Mlserver,
        "CORS policy object (allow_origins, allow_origin_regex, allow_credentials, allow_methods, \
         allow_headers, expose_headers, max_age); no CORS headers when null",
    ),
    doc(
        "metrics_endpoint",
        "MLSERVER_METRICS_ENDPOINT",
        Some("--metrics-endpoint"),
        "/metrics",
        Mlserver,
        "Path of the Prometheus endpoint on the metrics port; null, \"\" or \"none\" disables metrics",
    ),
    doc(
        "metrics_port",
        "MLSERVER_METRICS_PORT",
        Some("--metrics-port"),
        "8082",
        Mlserver,
        "Port of the metrics listener",
    ),
    doc(
        "metrics_rest_server_prefix",
        "MLSERVER_METRICS_REST_SERVER_PREFIX",
        Some("--metrics-rest-server-prefix"),
        "rest_server",
        Mlserver,
        "Name prefix of the REST request metrics",
    ),
    doc(
        "metrics_dir",
        "MLSERVER_METRICS_DIR",
        None,
        "<cwd>/.metrics",
        Ignored,
        "MLServer's multi-process metrics folder (sdserve keeps metrics in memory)",
    ),
    doc(
        "use_structured_logging",
        "MLSERVER_USE_STRUCTURED_LOGGING",
        None,
        "false",
        Mlserver,
        "Write JSON log lines",
    ),
    doc(
        "logging_settings",
        "MLSERVER_LOGGING_SETTINGS",
        None,
        "null",
        Ignored,
        "Python logging configuration (file path or object)",
    ),
    doc(
        "kafka_enabled",
        "MLSERVER_KAFKA_ENABLED",
        None,
        "false",
        Ignored,
        "Serve inference requests from Kafka",
    ),
    doc(
        "kafka_servers",
        "MLSERVER_KAFKA_SERVERS",
        None,
        "localhost:9092",
        Ignored,
        "Kafka bootstrap servers",
    ),
    doc(
        "kafka_topic_input",
        "MLSERVER_KAFKA_TOPIC_INPUT",
        None,
        "mlserver-input",
        Ignored,
        "Kafka topic of requests",
    ),
    doc(
        "kafka_topic_output",
        "MLSERVER_KAFKA_TOPIC_OUTPUT",
        None,
        "mlserver-output",
        Ignored,
        "Kafka topic of responses",
    ),
    doc(
        "tracing_server",
        "MLSERVER_TRACING_SERVER",
        None,
        "null",
        Ignored,
        "OpenTelemetry collector address",
    ),
    doc(
        "cache_enabled",
        "MLSERVER_CACHE_ENABLED",
        None,
        "false",
        Ignored,
        "Response cache keyed on the whole request",
    ),
    doc(
        "cache_size",
        "MLSERVER_CACHE_SIZE",
        None,
        "100",
        Ignored,
        "Entries of the response cache",
    ),
    doc(
        "gzip_enabled",
        "MLSERVER_GZIP_ENABLED",
        None,
        "true",
        Mlserver,
        "Gzip-compress responses for clients that accept it",
    ),
    doc(
        "max_queue_size",
        "MLSERVER_MAX_QUEUE_SIZE",
        Some("--max-queue-size"),
        "16",
        Sdserve,
        "Requests that may wait for a worker (all models together); beyond that requests get 503 with Retry-After",
    ),
    doc(
        "request_timeout",
        "MLSERVER_REQUEST_TIMEOUT",
        Some("--request-timeout"),
        "600",
        Sdserve,
        "Seconds a request may take from arrival to result, queueing included (504 past it); 0 = no limit",
    ),
    doc(
        "drain_timeout",
        "MLSERVER_DRAIN_TIMEOUT",
        Some("--drain-timeout"),
        "30",
        Sdserve,
        "Seconds in-flight requests may take to finish after SIGTERM/SIGINT",
    ),
    doc(
        "max_request_body_bytes",
        "MLSERVER_MAX_REQUEST_BODY_BYTES",
        Some("--max-request-body-bytes"),
        "67108864",
        Sdserve,
        "Largest request body in bytes (64 MiB); larger bodies get 413",
    ),
    doc(
        "memory_budget",
        "MLSERVER_MEMORY_BUDGET",
        Some("--memory-budget"),
        "auto",
        Sdserve,
        "Memory the weights and running generations of a device may take together: `auto` (on the CPU what the process may use: the cgroup limit, physical memory or `ulimit -v`, less a tenth; GPUs: no budget), `off`, or a size (`24GiB`, `512MiB`, bytes). A request that could never fit gets 400; one that fits later waits in the queue",
    ),
    doc(
        "header_read_timeout",
        "MLSERVER_HEADER_READ_TIMEOUT",
        None,
        "10",
        Sdserve,
        "Seconds a client may take to send a request's headers on the HTTP and metrics listeners; slower connections are closed (on gRPC a connection with no complete call is closed by the keep-alive timeout)",
    ),
    doc(
        "keep_alive_timeout",
        "MLSERVER_KEEP_ALIVE_TIMEOUT",
        None,
        "5",
        Sdserve,
        "Seconds an HTTP, gRPC or metrics connection may stay open with no request in flight (uvicorn's keep-alive timeout, as MLServer runs it); gRPC connections get GOAWAY and clients reconnect",
    ),
    doc(
        "max_connections",
        "MLSERVER_MAX_CONNECTIONS",
        None,
        "2048",
        Sdserve,
        "Open connections per HTTP, gRPC or metrics listener; beyond it the longest-idle one is closed, or the newcomer gets 503 (gRPC: UNAVAILABLE) when all are busy",
    ),
    doc(
        "auth_token",
        "MLSERVER_AUTH_TOKEN",
        None,
        "null",
        Sdserve,
        "If set, clients must send `Authorization: Bearer <token>`; null = no authentication",
    ),
];

/// The row of `SERVER_SETTINGS` for `key`.
pub fn server_setting_doc(key: &str) -> Option<&'static SettingDoc> {
    SERVER_SETTINGS.iter().find(|d| d.key == key)
}

/// A Markdown table of `docs` (for the README): key, variable, flag, default, description.
/// Settings sdserve ignores are marked "accepted, no effect"; sdserve's own are marked "sdserve".
pub fn markdown_table(docs: &[SettingDoc]) -> String {
    let mut out = String::from(
        "| key | environment variable | flag | default | description |\n|---|---|---|---|---|\n",
    );
    for d in docs {
        let note = match d.kind {
            SettingKind::Mlserver => "",
            SettingKind::Sdserve => " (sdserve)",
            SettingKind::Ignored => " (accepted, no effect)",
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | `{}` | {}{} |\n",
            d.key,
            d.env,
            d.flag.map(|f| format!("`{f}`")).unwrap_or_default(),
            d.default,
            d.description.replace('|', "\\|"),
            note
        ));
    }
    out
}

/// MLServer's `CORSSettings`. Inside it, fields not in the object come from `MLSERVER_<FIELD>`
/// variables (pydantic-settings reads nested settings that way), e.g. `MLSERVER_ALLOW_ORIGINS`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorsSettings {
    pub allow_origins: Vec<String>,
    pub allow_origin_regex: Option<String>,
    pub allow_credentials: bool,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        CorsSettings {
            allow_origins: Vec::new(),
            allow_origin_regex: None,
            allow_credentials: false,
            allow_methods: vec!["GET".to_string()],
            allow_headers: Vec::new(),
            expose_headers: Vec::new(),
            max_age: 600,
        }
    }
}

const CORS_KEYS: &[&str] = &[
    "allow_origins",
    "allow_origin_regex",
    "allow_credentials",
    "allow_methods",
    "allow_headers",
    "expose_headers",
    "max_age",
];

/// Server settings. Field names are the `settings.json` keys; see [`SERVER_SETTINGS`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerSettings {
    pub debug: bool,
    pub parallel_workers: usize,
    pub parallel_workers_timeout: u64,
    /// `None`: MLServer's default, `<cwd>/.envs`.
    pub environments_dir: Option<String>,
    pub model_repository_implementation: Option<String>,
    pub model_repository_root: PathBuf,
    pub model_repository_implementation_args: Map<String, Value>,
    pub load_models_at_startup: bool,
    pub server_name: String,
    pub server_version: String,
    pub extensions: Vec<String>,
    pub host: String,
    pub http_port: u16,
    pub root_path: String,
    pub grpc_port: u16,
    pub grpc_max_message_length: Option<u64>,
    pub cors_settings: Option<CorsSettings>,
    /// `None` disables metrics.
    pub metrics_endpoint: Option<String>,
    pub metrics_port: u16,
    pub metrics_rest_server_prefix: String,
    /// `None`: MLServer's default, `<cwd>/.metrics`.
    pub metrics_dir: Option<String>,
    pub use_structured_logging: bool,
    /// A file path (string) or a logging configuration object.
    pub logging_settings: Option<Value>,
    pub kafka_enabled: bool,
    pub kafka_servers: String,
    pub kafka_topic_input: String,
    pub kafka_topic_output: String,
    pub tracing_server: Option<String>,
    pub cache_enabled: bool,
    pub cache_size: i64,
    pub gzip_enabled: bool,
    /// Requests per model that may wait for a worker.
    pub max_queue_size: usize,
    /// Seconds; 0 = no limit.
    pub request_timeout: f64,
    /// Seconds.
    pub drain_timeout: f64,
    pub max_request_body_bytes: u64,
    pub memory_budget: MemoryBudgetSetting,
    /// Seconds.
    pub header_read_timeout: f64,
    /// Seconds.
    pub keep_alive_timeout: f64,
    pub max_connections: usize,
    #[serde(serialize_with = "redact")]
    pub auth_token: Option<String>,
}

fn redact<S: serde::Serializer>(token: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            debug: true,
            parallel_workers: 1,
            parallel_workers_timeout: 5,
            environments_dir: None,
            model_repository_implementation: None,
            model_repository_root: PathBuf::from("."),
            model_repository_implementation_args: Map::new(),
            load_models_at_startup: true,
            server_name: "mlserver".into(),
            server_version: SDSERVE_VERSION.into(),
            extensions: Vec::new(),
            host: "0.0.0.0".into(),
            http_port: 8080,
            root_path: String::new(),
            grpc_port: 8081,
            grpc_max_message_length: None,
            cors_settings: None,
            metrics_endpoint: Some("/metrics".into()),
            metrics_port: 8082,
            metrics_rest_server_prefix: "rest_server".into(),
            metrics_dir: None,
            use_structured_logging: false,
            logging_settings: None,
            kafka_enabled: false,
            kafka_servers: "localhost:9092".into(),
            kafka_topic_input: "mlserver-input".into(),
            kafka_topic_output: "mlserver-output".into(),
            tracing_server: None,
            cache_enabled: false,
            cache_size: 100,
            gzip_enabled: true,
            max_queue_size: 16,
            request_timeout: 600.0,
            drain_timeout: 30.0,
            max_request_body_bytes: 64 * 1024 * 1024,
            memory_budget: MemoryBudgetSetting::Auto,
            header_read_timeout: 10.0,
            keep_alive_timeout: 5.0,
            max_connections: 2048,
            auth_token: None,
        }
    }
}

/// Values given on the command line; `None` leaves the setting as the file, the environment or
/// the default made it. The binary fills this from its flags (see [`SettingDoc::flag`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerOverrides {
    pub debug: Option<bool>,
    pub parallel_workers: Option<usize>,
    pub load_models_at_startup: Option<bool>,
    pub host: Option<String>,
    pub http_port: Option<u16>,
    pub grpc_port: Option<u16>,
    /// As text: `""`, `null` or `none` disables metrics.
    pub metrics_endpoint: Option<String>,
    pub metrics_port: Option<u16>,
    pub metrics_rest_server_prefix: Option<String>,
    pub max_queue_size: Option<usize>,
    pub request_timeout: Option<f64>,
    pub drain_timeout: Option<f64>,
    pub max_request_body_bytes: Option<u64>,
    pub memory_budget: Option<MemoryBudgetSetting>,
}

// Checks shared by every source, so a value is judged the same wherever it comes from.

#[allow(clippy::ptr_arg)] // used as `Fn(&T)` by `Sources::get_checked`
fn check_host(host: &String) -> Result<(), String> {
    if host.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

/// Longest timeout accepted (about 31 years): longer ones cannot be added to a clock reading.
const MAX_TIMEOUT_SECONDS: f64 = 1e9;

fn check_seconds(secs: &f64) -> Result<(), String> {
    if secs.is_finite() && *secs >= 0.0 && *secs <= MAX_TIMEOUT_SECONDS {
        Ok(())
    } else {
        Err(format!(
            "must be a number of seconds between 0 and {MAX_TIMEOUT_SECONDS:e}"
        ))
    }
}

fn check_positive_seconds(secs: &f64) -> Result<(), String> {
    if *secs > 0.0 {
        check_seconds(secs)
    } else {
        Err(format!(
            "must be a number of seconds above 0, at most {MAX_TIMEOUT_SECONDS:e}"
        ))
    }
}

fn check_at_least_one_usize(n: &usize) -> Result<(), String> {
    if *n >= 1 {
        Ok(())
    } else {
        Err("must be at least 1".into())
    }
}

fn check_at_least_one_u64(n: &u64) -> Result<(), String> {
    if *n >= 1 {
        Ok(())
    } else {
        Err("must be at least 1".into())
    }
}

#[allow(clippy::ptr_arg)] // used as `Fn(&T)` by `Sources::get_checked`
fn check_metric_prefix(prefix: &String) -> Result<(), String> {
    let mut chars = prefix.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if valid {
        Ok(())
    } else {
        Err("must be a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)".into())
    }
}

fn check_auth_token(token: &Option<String>) -> Result<(), String> {
    match token {
        Some(t) if t.is_empty() => {
            Err("must not be empty (leave it unset to disable authentication)".into())
        }
        Some(t) if !t.chars().all(|c| c.is_ascii_graphic()) => {
            Err("must be printable ASCII without spaces (it is sent in an HTTP header)".into())
        }
        _ => Ok(()),
    }
}

fn check_logging_settings(v: &Option<Value>) -> Result<(), String> {
    match v {
        None | Some(Value::String(_)) | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(format!(
            "expected a file path or an object, {}",
            describe(other)
        )),
    }
}

/// `null`, `""` and `"none"` disable metrics; anything else must be a path.
fn normalize_metrics_endpoint(v: Option<String>) -> Result<Option<String>, String> {
    match v {
        None => Ok(None),
        Some(s) => {
            let t = s.trim();
            if t.is_empty() || t.eq_ignore_ascii_case("null") || t.eq_ignore_ascii_case("none") {
                Ok(None)
            } else if t.starts_with('/') {
                Ok(Some(t.to_string()))
            } else {
                Err("must start with '/' (or be null to disable metrics)".into())
            }
        }
    }
}

/// Turns an error in the fields of a JSON object read from variable `var` into an error that
/// names the variable.
pub(crate) fn nested_env_error(var: &str, text: &str, err: SettingsError) -> SettingsError {
    match err {
        SettingsError::InvalidValue { key, message, .. } => SettingsError::InvalidEnv {
            var: var.to_string(),
            value: text.to_string(),
            message: format!("`{key}`: {message}"),
        },
        other => other,
    }
}

impl ServerSettings {
    /// Reads `<root>/settings.json` (if it is a file) over `MLSERVER_*` variables over defaults,
    /// and sets `model_repository_root` to `root`. Returns warnings (unknown keys, settings
    /// sdserve accepts but ignores).
    pub fn load(root: &Path, env: &Env) -> Result<(ServerSettings, Vec<String>), SettingsError> {
        let path = root.join(SETTINGS_FILE);
        let file = if path.is_file() {
            Some(read_json_object(&path)?)
        } else {
            None
        };
        let mut warnings = Vec::new();
        let mut settings = Self::from_sources(
            file.as_ref().map(|obj| (path.as_path(), obj)),
            env,
            &mut warnings,
        )?;
        settings.model_repository_root = root.to_path_buf();
        Ok((settings, warnings))
    }

    /// Settings from an already parsed settings object (if any) and the environment.
    pub fn from_sources(
        file: Option<(&Path, &Map<String, Value>)>,
        env: &Env,
        warnings: &mut Vec<String>,
    ) -> Result<ServerSettings, SettingsError> {
        let origin = match file {
            Some((path, _)) => Origin::File(path.to_path_buf()),
            None => Origin::File(PathBuf::from(SETTINGS_FILE)),
        };
        let obj = file.map(|(_, obj)| obj);
        if let Some(obj) = obj {
            let known: Vec<&str> = SERVER_SETTINGS.iter().map(|d| d.key).collect();
            unknown_key_warnings(obj, &known, &origin, "", warnings);
        }
        let src = Sources {
            obj,
            origin: &origin,
            key_prefix: "",
            env,
            env_prefix: ENV_PREFIX,
        };
        let mut s = ServerSettings::default();

        macro_rules! take {
            ($field:ident) => {
                if let Some(v) = src.get(stringify!($field))? {
                    s.$field = v;
                }
            };
            ($field:ident, $check:expr) => {
                if let Some(v) = src.get_checked(stringify!($field), $check)? {
                    s.$field = v;
                }
            };
        }

        take!(debug);
        take!(parallel_workers);
        take!(parallel_workers_timeout);
        take!(environments_dir);
        take!(model_repository_implementation);
        if let Some(root) = src.get::<String>("model_repository_root")? {
            s.model_repository_root = PathBuf::from(root);
        }
        take!(model_repository_implementation_args);
        take!(load_models_at_startup);
        take!(server_name);
        take!(server_version);
        take!(extensions);
        take!(host, check_host);
        take!(http_port);
        take!(root_path);
        take!(grpc_port);
        take!(grpc_max_message_length);
        s.cors_settings = parse_cors(&src, warnings)?;
        if let Some(v) = src.get_checked("metrics_endpoint", |v: &Option<String>| {
            normalize_metrics_endpoint(v.clone()).map(|_| ())
        })? {
            s.metrics_endpoint = normalize_metrics_endpoint(v).expect("checked above");
        }
        take!(metrics_port);
        take!(metrics_rest_server_prefix, check_metric_prefix);
        take!(metrics_dir);
        take!(use_structured_logging);
        take!(logging_settings, check_logging_settings);
        take!(kafka_enabled);
        take!(kafka_servers);
        take!(kafka_topic_input);
        take!(kafka_topic_output);
        take!(tracing_server);
        take!(cache_enabled);
        take!(cache_size);
        take!(gzip_enabled);
        take!(max_queue_size, check_at_least_one_usize);
        take!(request_timeout, check_seconds);
        take!(drain_timeout, check_seconds);
        take!(max_request_body_bytes, check_at_least_one_u64);
        take!(memory_budget);
        take!(header_read_timeout, check_positive_seconds);
        take!(keep_alive_timeout, check_positive_seconds);
        take!(max_connections, check_at_least_one_usize);
        take!(auth_token, check_auth_token);

        warnings.extend(s.unsupported_warnings());
        Ok(s)
    }

    /// Applies command-line values (they beat every other source).
    pub fn apply_overrides(&mut self, o: &ServerOverrides) -> Result<(), SettingsError> {
        fn flag_err(key: &str, value: impl std::fmt::Display, message: String) -> SettingsError {
            let flag = server_setting_doc(key)
                .and_then(|d| d.flag)
                .unwrap_or(key)
                .to_string();
            SettingsError::InvalidFlag {
                flag,
                value: value.to_string(),
                message,
            }
        }
        fn checked<T: Clone + std::fmt::Display>(
            key: &str,
            v: &Option<T>,
            check: impl Fn(&T) -> Result<(), String>,
        ) -> Result<Option<T>, SettingsError> {
            match v {
                Some(v) => check(v)
                    .map(|()| Some(v.clone()))
                    .map_err(|m| flag_err(key, v, m)),
                None => Ok(None),
            }
        }
        // Types alone make these valid.
        for (field, value) in [
            (&mut self.debug, o.debug),
            (&mut self.load_models_at_startup, o.load_models_at_startup),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        for (field, value) in [
            (&mut self.http_port, o.http_port),
            (&mut self.grpc_port, o.grpc_port),
            (&mut self.metrics_port, o.metrics_port),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        if let Some(v) = o.parallel_workers {
            self.parallel_workers = v;
        }

        if let Some(v) = checked("host", &o.host, check_host)? {
            self.host = v;
        }
        if let Some(v) = &o.metrics_endpoint {
            self.metrics_endpoint = normalize_metrics_endpoint(Some(v.clone()))
                .map_err(|m| flag_err("metrics_endpoint", v, m))?;
        }
        if let Some(v) = checked(
            "metrics_rest_server_prefix",
            &o.metrics_rest_server_prefix,
            check_metric_prefix,
        )? {
            self.metrics_rest_server_prefix = v;
        }
        if let Some(v) = checked(
            "max_queue_size",
            &o.max_queue_size,
            check_at_least_one_usize,
        )? {
            self.max_queue_size = v;
        }
        if let Some(v) = checked("request_timeout", &o.request_timeout, check_seconds)? {
            self.request_timeout = v;
        }
        if let Some(v) = checked("drain_timeout", &o.drain_timeout, check_seconds)? {
            self.drain_timeout = v;
        }
        if let Some(v) = checked(
            "max_request_body_bytes",
            &o.max_request_body_bytes,
            check_at_least_one_u64,
        )? {
            self.max_request_body_bytes = v;
        }
        if let Some(v) = o.memory_budget {
            self.memory_budget = v;
        }
        Ok(())
    }

    /// Checks between settings, once every source has been applied.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.metrics_enabled() && self.http_port != 0 && self.http_port == self.metrics_port {
            return Err(SettingsError::Conflict {
                message: format!(
                    "http_port and metrics_port are both {}; metrics need their own port \
                     (or set metrics_endpoint to null)",
                    self.http_port
                ),
            });
        }
        Ok(())
    }

    pub fn metrics_enabled(&self) -> bool {
        self.metrics_endpoint.is_some()
    }

    /// `None` when requests have no deadline (`request_timeout` 0).
    pub fn request_timeout_duration(&self) -> Option<Duration> {
        (self.request_timeout > 0.0).then(|| Duration::from_secs_f64(self.request_timeout))
    }

    pub fn drain_timeout_duration(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout)
    }

    /// The settings as JSON, keyed like `settings.json`, with `auth_token` redacted (for logs).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("settings serialize to JSON")
    }

    /// One warning per setting sdserve accepts but ignores that is not at its default.
    pub fn unsupported_warnings(&self) -> Vec<String> {
        let current = self.to_json();
        let default = ServerSettings::default().to_json();
        SERVER_SETTINGS
            .iter()
            .filter(|d| d.kind == SettingKind::Ignored && current[d.key] != default[d.key])
            .map(|d| {
                format!(
                    "setting `{}` ({}) = {} is accepted but not supported by sdserve; it has no \
                     effect",
                    d.key, d.env, current[d.key]
                )
            })
            .collect()
    }
}

fn parse_cors(
    src: &Sources<'_>,
    warnings: &mut Vec<String>,
) -> Result<Option<CorsSettings>, SettingsError> {
    let parse_obj = |obj: &Map<String, Value>, origin: &Origin, warnings: &mut Vec<String>| {
        unknown_key_warnings(obj, CORS_KEYS, origin, "cors_settings.", warnings);
        let inner = Sources {
            obj: Some(obj),
            origin,
            key_prefix: "cors_settings.",
            env: src.env,
            env_prefix: ENV_PREFIX,
        };
        let d = CorsSettings::default();
        Ok::<_, SettingsError>(CorsSettings {
            allow_origins: inner
                .get::<Option<_>>("allow_origins")?
                .flatten()
                .unwrap_or(d.allow_origins),
            allow_origin_regex: inner.get::<Option<_>>("allow_origin_regex")?.flatten(),
            allow_credentials: inner
                .get::<Option<_>>("allow_credentials")?
                .flatten()
                .unwrap_or(d.allow_credentials),
            allow_methods: inner
                .get::<Option<_>>("allow_methods")?
                .flatten()
                .unwrap_or(d.allow_methods),
            allow_headers: inner
                .get::<Option<_>>("allow_headers")?
                .flatten()
                .unwrap_or(d.allow_headers),
            expose_headers: inner
                .get::<Option<_>>("expose_headers")?
                .flatten()
                .unwrap_or(d.expose_headers),
            max_age: inner
                .get::<Option<_>>("max_age")?
                .flatten()
                .unwrap_or(d.max_age),
        })
    };
    if let Some(v) = src.obj.and_then(|o| o.get("cors_settings")) {
        return match v {
            Value::Null => Ok(None),
            Value::Object(obj) => parse_obj(obj, src.origin, warnings).map(Some),
            other => Err(SettingsError::InvalidValue {
                origin: src.origin.clone(),
                key: "cors_settings".into(),
                message: format!("expected an object, {}", describe(other)),
            }),
        };
    }
    let var = src.env_var("cors_settings");
    let Some(text) = src.env.get(&var) else {
        return Ok(None);
    };
    let invalid = |message: String| SettingsError::InvalidEnv {
        var: var.clone(),
        value: text.to_string(),
        message,
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Null) => Ok(None),
        Ok(Value::Object(obj)) => {
            let origin = Origin::File(PathBuf::from(&var));
            parse_obj(&obj, &origin, warnings)
                .map(Some)
                .map_err(|e| nested_env_error(&var, text, e))
        }
        Ok(other) => Err(invalid(format!(
            "expected a JSON object, {}",
            describe(&other)
        ))),
        Err(e) => Err(invalid(format!("expected a JSON object: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::new(vars.iter().copied(), "/work")
    }

    fn from_json(v: Value, env: &Env) -> Result<(ServerSettings, Vec<String>), SettingsError> {
        let Value::Object(obj) = v else { panic!() };
        let mut warnings = Vec::new();
        let s = ServerSettings::from_sources(
            Some((Path::new("/repo/settings.json"), &obj)),
            env,
            &mut warnings,
        )?;
        Ok((s, warnings))
    }

    #[test]
    fn timeouts_too_long_for_a_clock_are_refused() {
        // Once a panic in request_timeout_duration() at startup.
        for key in ["request_timeout", "drain_timeout"] {
            let err = from_json(json!({ key: 1e30 }), &env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("between 0 and"), "{err}");
        }
        let var = [("MLSERVER_REQUEST_TIMEOUT", "1e20")];
        let err = from_json(json!({}), &env(&var)).unwrap_err().to_string();
        assert!(err.contains("MLSERVER_REQUEST_TIMEOUT"), "{err}");
        let (s, _) = from_json(
            json!({"request_timeout": 1e9, "drain_timeout": 1e9}),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(
            s.request_timeout_duration(),
            Some(Duration::from_secs(1_000_000_000))
        );
        assert_eq!(
            s.drain_timeout_duration(),
            Duration::from_secs(1_000_000_000)
        );
    }

    #[test]
    fn defaults_match_mlserver() {
        let mut w = Vec::new();
        let s = ServerSettings::from_sources(None, &env(&[]), &mut w).unwrap();
        assert!(w.is_empty());
        assert_eq!(s, ServerSettings::default());
        assert!(s.debug);
        assert_eq!(
            (s.http_port, s.grpc_port, s.metrics_port),
            (8080, 8081, 8082)
        );
        assert_eq!(s.metrics_endpoint.as_deref(), Some("/metrics"));
        assert_eq!(s.host, "0.0.0.0");
        assert_eq!(s.parallel_workers, 1);
        assert!(s.load_models_at_startup);
        assert_eq!(s.max_request_body_bytes, 67_108_864);
        assert_eq!(s.request_timeout_duration(), Some(Duration::from_secs(600)));
        assert_eq!(s.drain_timeout_duration(), Duration::from_secs(30));
        assert_eq!(s.auth_token, None);
    }

    #[test]
    fn env_beats_default() {
        let e = env(&[
            ("MLSERVER_HTTP_PORT", "18080"),
            ("MLSERVER_DEBUG", "no"),
            ("MLSERVER_EXTENSIONS", r#"["a"]"#),
            ("MLSERVER_REQUEST_TIMEOUT", "0"),
            ("MLSERVER_CORS_SETTINGS", r#"{"allow_origins":["*"]}"#),
            ("MLSERVER_MAX_AGE", "5"),
        ]);
        let mut w = Vec::new();
        let s = ServerSettings::from_sources(None, &e, &mut w).unwrap();
        assert_eq!(s.http_port, 18080);
        assert!(!s.debug);
        assert_eq!(s.extensions, vec!["a".to_string()]);
        assert_eq!(s.request_timeout_duration(), None);
        let cors = s.cors_settings.unwrap();
        assert_eq!(cors.allow_origins, vec!["*".to_string()]);
        assert_eq!(cors.max_age, 5);
        assert_eq!(cors.allow_methods, vec!["GET".to_string()]);
    }

    #[test]
    fn file_beats_env() {
        let e = env(&[
            ("MLSERVER_DEBUG", "true"),
            ("MLSERVER_HTTP_PORT", "18080"),
            ("MLSERVER_GRPC_PORT", "18081"),
        ]);
        let (s, w) = from_json(json!({"debug": false, "http_port": 9000}), &e).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert!(!s.debug);
        assert_eq!(s.http_port, 9000);
        // Not in the file: the environment still applies.
        assert_eq!(s.grpc_port, 18081);
    }

    #[test]
    fn flag_beats_file_and_env() {
        let e = env(&[("MLSERVER_METRICS_PORT", "7000")]);
        let (mut s, _) = from_json(json!({"http_port": 9000, "debug": true}), &e).unwrap();
        s.apply_overrides(&ServerOverrides {
            http_port: Some(9100),
            debug: Some(false),
            metrics_port: Some(7100),
            metrics_endpoint: Some("none".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.http_port, 9100);
        assert!(!s.debug);
        assert_eq!(s.metrics_port, 7100);
        assert_eq!(s.metrics_endpoint, None);
    }

    #[test]
    fn invalid_flag_names_the_flag() {
        let mut s = ServerSettings::default();
        let err = s
            .apply_overrides(&ServerOverrides {
                request_timeout: Some(-1.0),
                ..Default::default()
            })
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("--request-timeout") && text.contains("-1"),
            "{text}"
        );
        let err = s
            .apply_overrides(&ServerOverrides {
                metrics_endpoint: Some("metrics".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("--metrics-endpoint"), "{err}");
    }

    #[test]
    fn metrics_endpoint_null_disables_metrics() {
        let e = env(&[("MLSERVER_METRICS_ENDPOINT", "/other")]);
        let (s, _) = from_json(json!({"metrics_endpoint": null}), &e).unwrap();
        assert_eq!(s.metrics_endpoint, None);
        assert!(!s.metrics_enabled());
        let (s, _) = from_json(json!({"metrics_endpoint": ""}), &env(&[])).unwrap();
        assert_eq!(s.metrics_endpoint, None);
        for text in ["", "null", "None"] {
            let mut w = Vec::new();
            let s = ServerSettings::from_sources(
                None,
                &env(&[("MLSERVER_METRICS_ENDPOINT", text)]),
                &mut w,
            )
            .unwrap();
            assert_eq!(s.metrics_endpoint, None, "{text:?}");
        }
        let (s, _) = from_json(json!({"metrics_endpoint": "/prom"}), &env(&[])).unwrap();
        assert_eq!(s.metrics_endpoint.as_deref(), Some("/prom"));
        let err = from_json(json!({"metrics_endpoint": "prom"}), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("`metrics_endpoint`"), "{err}");
    }

    #[test]
    fn malformed_env_names_variable_and_value() {
        let mut w = Vec::new();
        let err =
            ServerSettings::from_sources(None, &env(&[("MLSERVER_HTTP_PORT", "abc")]), &mut w)
                .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("MLSERVER_HTTP_PORT") && text.contains("\"abc\""),
            "{text}"
        );
        let err = ServerSettings::from_sources(
            None,
            &env(&[("MLSERVER_CORS_SETTINGS", r#"{"max_age":"x"}"#)]),
            &mut w,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("MLSERVER_CORS_SETTINGS") && text.contains("max_age"),
            "{text}"
        );
        let err = ServerSettings::from_sources(None, &env(&[("MLSERVER_DEBUG", "maybe")]), &mut w)
            .unwrap_err();
        assert!(err.to_string().contains("MLSERVER_DEBUG"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let err = from_json(json!({"http_port": "eighty"}), &env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/repo/settings.json") && text.contains("`http_port`"),
            "{text}"
        );
        let err =
            from_json(json!({"cors_settings": {"allow_origins": "*"}}), &env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("`cors_settings.allow_origins`"),
            "{err}"
        );
        let err = from_json(json!({"auth_token": ""}), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("`auth_token`"), "{err}");
        let err = from_json(json!({"max_queue_size": 0}), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("`max_queue_size`"), "{err}");
    }

    #[test]
    fn lax_values_like_pydantic() {
        let (s, _) = from_json(
            json!({"http_port": "9000", "debug": "false", "request_timeout": 5}),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.http_port, 9000);
        assert!(!s.debug);
        assert_eq!(s.request_timeout, 5.0);
    }

    #[test]
    fn unknown_keys_warn_with_a_suggestion() {
        let (_, w) = from_json(json!({"http_prot": 1, "zzz": true}), &env(&[])).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter()
                .any(|m| m.contains("`http_prot`") && m.contains("`http_port`"))
        );
        assert!(
            w.iter()
                .any(|m| m.contains("`zzz`") && m.contains("/repo/settings.json"))
        );
    }

    #[test]
    fn unsupported_settings_warn_only_when_not_default() {
        let (_, w) = from_json(
            json!({"kafka_enabled": false, "cache_size": 100, "tracing_server": null}),
            &env(&[]),
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        let (_, w) = from_json(
            json!({"kafka_enabled": true, "tracing_server": "otel:4317"}),
            &env(&[("MLSERVER_CACHE_ENABLED", "1")]),
        )
        .unwrap();
        assert_eq!(w.len(), 3, "{w:?}");
        for key in ["kafka_enabled", "tracing_server", "cache_enabled"] {
            assert!(
                w.iter().any(|m| m.contains(&format!("`{key}`"))),
                "{key}: {w:?}"
            );
        }
    }

    #[test]
    fn port_conflict_is_reported() {
        let mut s = ServerSettings {
            metrics_port: 8080,
            ..Default::default()
        };
        assert!(s.validate().is_err());
        s.metrics_endpoint = None;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn markdown_table_has_a_row_per_setting() {
        let table = markdown_table(SERVER_SETTINGS);
        assert_eq!(table.lines().count(), SERVER_SETTINGS.len() + 2);
        assert!(table.contains("| `http_port` | `MLSERVER_HTTP_PORT` | `--http-port` | `8080` |"));
        assert!(table.contains("(accepted, no effect)"));
    }

    #[test]
    fn auth_token_is_redacted_in_json() {
        let s = ServerSettings {
            auth_token: Some("secret".into()),
            ..Default::default()
        };
        assert!(!s.to_json().to_string().contains("secret"));
    }

    fn default_text(v: &Value) -> String {
        match v {
            Value::String(s) if s.is_empty() => "\"\"".into(),
            Value::String(s) => s.clone(),
            Value::Number(n) if n.as_f64().is_some_and(|x| x.fract() == 0.0) && n.is_f64() => {
                format!("{}", n.as_f64().unwrap() as i64)
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn table_matches_the_settings() {
        let json = ServerSettings::default().to_json();
        let Value::Object(fields) = &json else {
            panic!()
        };
        let keys: Vec<&str> = SERVER_SETTINGS.iter().map(|d| d.key).collect();
        let field_keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        let mut a = keys.clone();
        let mut b = field_keys.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "table keys vs struct fields");
        for d in SERVER_SETTINGS {
            assert_eq!(d.env, format!("MLSERVER_{}", d.key.to_ascii_uppercase()));
            if let Some(flag) = d.flag {
                assert_eq!(flag, format!("--{}", d.key.replace('_', "-")));
            }
            if !d.default.starts_with('<') {
                assert_eq!(
                    d.default,
                    default_text(&json[d.key]),
                    "default of {}",
                    d.key
                );
            }
            assert!(!d.description.is_empty());
        }
    }

    /// Every flag in the table has a field in `ServerOverrides`, and no other field exists.
    #[test]
    fn overrides_cover_exactly_the_flags() {
        let base = ServerSettings {
            metrics_endpoint: Some("/m".into()),
            ..Default::default()
        };
        let mut s = base.clone();
        s.apply_overrides(&ServerOverrides {
            debug: Some(false),
            parallel_workers: Some(3),
            load_models_at_startup: Some(false),
            host: Some("127.0.0.1".into()),
            http_port: Some(1),
            grpc_port: Some(2),
            metrics_endpoint: Some("/x".into()),
            metrics_port: Some(3),
            metrics_rest_server_prefix: Some("p".into()),
            max_queue_size: Some(4),
            request_timeout: Some(5.0),
            drain_timeout: Some(6.0),
            max_request_body_bytes: Some(7),
            memory_budget: Some(MemoryBudgetSetting::Bytes(8)),
        })
        .unwrap();
        let (before, after) = (base.to_json(), s.to_json());
        let mut changed: Vec<&str> = SERVER_SETTINGS
            .iter()
            .map(|d| d.key)
            .filter(|k| before[k] != after[k])
            .collect();
        let mut flagged: Vec<&str> = SERVER_SETTINGS
            .iter()
            .filter(|d| d.flag.is_some())
            .map(|d| d.key)
            .collect();
        changed.sort_unstable();
        flagged.sort_unstable();
        assert_eq!(changed, flagged);
    }
}
