//! `sdserve start <folder>`: server settings from `<folder>/settings.json`, and every
//! `model-settings.json` below the folder, as MLServer's `SchemalessModelRepository` finds them.
//!
//! Differences from MLServer, on purpose: a file that fails to parse stops startup instead of
//! being skipped; results are sorted; hidden folders are skipped (as Python's glob does);
//! symbolic links are followed only when they stay inside the repository.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::env::Env;
use crate::error::SettingsError;
use crate::model::{MODEL_ENV_PREFIX, MODEL_SETTINGS_FILE, ModelSettings, declared_name};
use crate::server::{ServerOverrides, ServerSettings};
use crate::value::absolute;

/// Everything `sdserve start` needs from the repository.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub server: ServerSettings,
    /// In file-path order. Empty when `load_models_at_startup` is false (the files are then not
    /// read at all, as in MLServer).
    pub models: Vec<ModelSettings>,
    /// To be logged as warnings: unknown keys, ignored settings, skipped symbolic links.
    pub warnings: Vec<String>,
    /// To be logged as information: e.g. an MLServer class path served by the built-in pipeline.
    pub notes: Vec<String>,
}

/// Models found in the repository.
#[derive(Debug, Clone, Default)]
pub struct FoundModels {
    pub models: Vec<ModelSettings>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

/// Loads everything for `sdserve start <root>`. Precedence: `overrides` (command line) >
/// `settings.json` > `MLSERVER_*` variables > defaults.
pub fn discover(
    root: &Path,
    env: &Env,
    overrides: &ServerOverrides,
) -> Result<Loaded, SettingsError> {
    let root = repository_root(root, env)?;
    let mut warnings = env.warnings().to_vec();
    let (mut server, server_warnings) = ServerSettings::load(&root, env)?;
    warnings.extend(server_warnings);
    server.apply_overrides(overrides)?;
    server.validate()?;
    let mut notes = Vec::new();
    let mut models = Vec::new();
    if server.load_models_at_startup {
        let found = discover_models(&root, env)?;
        models = found.models;
        warnings.extend(found.warnings);
        notes.extend(found.notes);
    }
    Ok(Loaded {
        server,
        models,
        warnings,
        notes,
    })
}

/// Every model of the repository: one per `model-settings.json` below `root`, or, when there is
/// none, the model described by `MLSERVER_MODEL_*` variables (if `MLSERVER_MODEL_IMPLEMENTATION`
/// or `MLSERVER_MODEL_NAME` is set). Any invalid file is an error; so are two models with the
/// same name and version.
pub fn discover_models(root: &Path, env: &Env) -> Result<FoundModels, SettingsError> {
    let root = repository_root(root, env)?;
    let scan = scan(&root)?;
    let mut found = FoundModels {
        warnings: scan.warnings,
        ..Default::default()
    };
    for path in &scan.files {
        let model = ModelSettings::from_file(path, env, &mut found.warnings, &mut found.notes)?;
        found.models.push(model);
    }
    if scan.files.is_empty() && env_describes_a_model(env) {
        let model = ModelSettings::from_env(&root, env, &mut found.warnings, &mut found.notes)?;
        found.models.push(model);
    }
    check_duplicates(&found.models)?;
    Ok(found)
}

/// Re-scans the repository for the models named `name` (all their versions), for the
/// repository API's load. `name` must be a plain name, not a path. Only settings files inside
/// the repository are considered. An empty result means no such model. A file that belongs to
/// `name` (by its declared name, or by its folder's name when it declares none) but is invalid
/// is an error; invalid files of other models only give warnings.
pub fn find_model(root: &Path, name: &str, env: &Env) -> Result<FoundModels, SettingsError> {
    check_model_name(name)?;
    let root = repository_root(root, env)?;
    let canonical_root = canonical(&root)?;
    let scan = scan(&root)?;
    let mut found = FoundModels {
        warnings: scan.warnings,
        ..Default::default()
    };
    let mut failure = None;
    for path in &scan.files {
        let (mut warnings, mut notes) = (Vec::new(), Vec::new());
        match ModelSettings::from_file(path, env, &mut warnings, &mut notes) {
            Ok(model) if model.name == name => {
                // The scan never leaves the root; checked again in case the tree changed since.
                let inside = fs::canonicalize(path).is_ok_and(|p| p.starts_with(&canonical_root));
                if !inside {
                    found.warnings.push(format!(
                        "{}: skipped, it is not inside the model repository {}",
                        path.display(),
                        canonical_root.display()
                    ));
                    continue;
                }
                found.models.push(model);
                found.warnings.extend(warnings);
                found.notes.extend(notes);
            }
            Ok(_) => {}
            Err(e) => {
                let folder_name = path
                    .parent()
                    .and_then(Path::file_name)
                    .map(|n| n.to_string_lossy().into_owned());
                let belongs = match declared_name(path) {
                    Some(declared) => declared == name,
                    None => folder_name.as_deref() == Some(name),
                };
                if belongs {
                    failure.get_or_insert(e);
                } else {
                    found.warnings.push(format!("model settings skipped: {e}"));
                }
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if scan.files.is_empty() && env_describes_a_model(env) {
        let (mut warnings, mut notes) = (Vec::new(), Vec::new());
        let model = ModelSettings::from_env(&root, env, &mut warnings, &mut notes)?;
        if model.name == name {
            found.models.push(model);
            found.warnings.extend(warnings);
            found.notes.extend(notes);
        }
    }
    check_duplicates(&found.models)?;
    Ok(found)
}

fn env_describes_a_model(env: &Env) -> bool {
    ["IMPLEMENTATION", "NAME"]
        .iter()
        .any(|field| env.get(&format!("{MODEL_ENV_PREFIX}{field}")).is_some())
}

/// A name asked of the repository API must not be able to point anywhere.
fn check_model_name(name: &str) -> Result<(), SettingsError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name == "." || name == ".." {
        Some("must not be a path component")
    } else if name.contains(['/', '\\']) {
        Some("must not contain path separators")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SettingsError::InvalidModelName {
            name: name.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

fn check_duplicates(models: &[ModelSettings]) -> Result<(), SettingsError> {
    let mut seen: HashMap<(&str, Option<&str>), &ModelSettings> = HashMap::new();
    for model in models {
        if let Some(first) = seen.insert((&model.name, model.version()), model) {
            return Err(SettingsError::DuplicateModel {
                name: model.name.clone(),
                version: model.version().map(str::to_string),
                first: first.origin(),
                second: model.origin(),
            });
        }
    }
    Ok(())
}

/// The repository folder made absolute (without resolving links, like Python's abspath, so that
/// default model names are the folder names the user sees).
fn repository_root(root: &Path, env: &Env) -> Result<PathBuf, SettingsError> {
    let abs = absolute(env.cwd(), root);
    match fs::metadata(&abs) {
        Ok(meta) if meta.is_dir() => Ok(abs),
        Ok(_) => Err(SettingsError::Root {
            path: abs,
            reason: "is not a folder".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SettingsError::Root {
            path: abs,
            reason: "does not exist".into(),
        }),
        Err(source) => Err(SettingsError::Io { path: abs, source }),
    }
}

fn canonical(path: &Path) -> Result<PathBuf, SettingsError> {
    fs::canonicalize(path).map_err(|source| SettingsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

struct Scan {
    files: Vec<PathBuf>,
    warnings: Vec<String>,
}

/// Finds every `model-settings.json` below `root`, sorted. Real folders are walked first; then
/// symbolically linked folders whose target is inside the repository and was not walked yet
/// (so each folder is read once and a model keeps its real folder's name).
fn scan(root: &Path) -> Result<Scan, SettingsError> {
    let canonical_root = canonical(root)?;
    let mut walker = Walker {
        canonical_root: canonical_root.clone(),
        visited: HashSet::from([canonical_root]),
        linked_dirs: Vec::new(),
        files: Vec::new(),
        warnings: Vec::new(),
    };
    let entries = fs::read_dir(root).map_err(|source| SettingsError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    walker.walk_entries(entries);
    let mut next = 0;
    while next < walker.linked_dirs.len() {
        let (link, target) = walker.linked_dirs[next].clone();
        next += 1;
        if walker.visited.insert(target) {
            walker.walk(&link);
        }
    }
    walker.files.sort();
    Ok(Scan {
        files: walker.files,
        warnings: walker.warnings,
    })
}

struct Walker {
    canonical_root: PathBuf,
    visited: HashSet<PathBuf>,
    /// (link path, canonical target) of linked folders inside the repository.
    linked_dirs: Vec<(PathBuf, PathBuf)>,
    files: Vec<PathBuf>,
    warnings: Vec<String>,
}

impl Walker {
    fn walk(&mut self, dir: &Path) {
        match fs::read_dir(dir) {
            Ok(entries) => self.walk_entries(entries),
            Err(e) => self
                .warnings
                .push(format!("{}: not searched for models: {e}", dir.display())),
        }
    }

    fn walk_entries(&mut self, entries: fs::ReadDir) {
        let mut entries: Vec<fs::DirEntry> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let file_name = entry.file_name();
            let is_settings = file_name == MODEL_SETTINGS_FILE;
            let hidden = file_name.to_string_lossy().starts_with('.');
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                if hidden {
                    continue;
                }
                if let Ok(target) = fs::canonicalize(&path)
                    && self.visited.insert(target)
                {
                    self.walk(&path);
                }
            } else if file_type.is_file() {
                if is_settings {
                    self.files.push(path);
                }
            } else if file_type.is_symlink() && (is_settings || !hidden) {
                self.symlink(path, is_settings);
            }
        }
    }

    fn symlink(&mut self, path: PathBuf, is_settings: bool) {
        let Ok(target) = fs::canonicalize(&path) else {
            if is_settings {
                self.warnings.push(format!(
                    "{}: skipped, it is a broken symbolic link",
                    path.display()
                ));
            }
            return;
        };
        let inside = target.starts_with(&self.canonical_root);
        if target.is_dir() {
            if inside {
                self.linked_dirs.push((path, target));
            } else if target.join(MODEL_SETTINGS_FILE).is_file() {
                // Only worth a word when the link would have led to a model; links to shared
                // weights outside the repository are normal.
                self.warnings.push(format!(
                    "{}: not searched for models: the symbolic link leads outside the model \
                     repository (to {})",
                    path.display(),
                    target.display()
                ));
            }
        } else if is_settings && target.is_file() {
            if inside {
                self.files.push(path);
            } else {
                self.warnings.push(format!(
                    "{}: skipped: the symbolic link leads outside the model repository (to {})",
                    path.display(),
                    target.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Origin;
    use crate::model::Implementation;
    use std::os::unix::fs::symlink;

    const SD: &str = r#"{"implementation": "sdserve.StableDiffusion"}"#;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn env_in(cwd: &Path, vars: &[(&str, &str)]) -> Env {
        Env::new(vars.iter().copied(), cwd)
    }

    fn no_flags() -> ServerOverrides {
        ServerOverrides::default()
    }

    #[test]
    fn recursive_discovery_with_name_and_uri_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        write(&root.join("b-model/model-settings.json"), SD);
        write(
            &root.join("group/a-model/model-settings.json"),
            r#"{"name": "alpha", "implementation": "sdserve",
                "parameters": {"uri": "./weights", "version": "v1", "extra": {"dtype": "f16"}}}"#,
        );
        write(
            &root.join("group/c/model-settings.json"),
            r#"{"implementation": "sdserve", "parameters": {"uri": "../../shared/sd"}}"#,
        );
        // Hidden folders are not searched.
        write(&root.join(".git/x/model-settings.json"), "not json");
        let env = env_in(dir.path(), &[]);
        let loaded = discover(&root, &env, &no_flags()).unwrap();
        assert_eq!(loaded.server.model_repository_root, root);
        let names: Vec<&str> = loaded.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["b-model", "alpha", "c"]);
        let b = &loaded.models[0];
        assert_eq!(b.uri(), root.join("b-model"));
        assert_eq!(b.version(), None);
        assert_eq!(
            b.settings_file.as_deref(),
            Some(root.join("b-model/model-settings.json").as_path())
        );
        let a = &loaded.models[1];
        assert_eq!(a.uri(), root.join("group/a-model/weights"));
        assert_eq!(a.version(), Some("v1"));
        assert_eq!(a.parameters.extra["dtype"], "f16");
        assert_eq!(loaded.models[2].uri(), root.join("shared/sd"));
        // "alpha" differs from its folder's name: MLServer warns about that too.
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("\"alpha\"") && w.contains("a-model")),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn relative_root_is_resolved_against_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("models/sd/model-settings.json"), SD);
        write(
            &dir.path().join("models/model-settings.json"),
            r#"{"implementation": "sdserve", "parameters": {"version": "2"}}"#,
        );
        let env = env_in(dir.path(), &[]);
        let found = discover_models(Path::new("./models"), &env).unwrap();
        let names: Vec<&str> = found.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["models", "sd"]);
        assert_eq!(found.models[0].uri(), dir.path().join("models"));
    }

    #[test]
    fn env_applies_to_fields_the_file_does_not_set() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"parameters": {"version": "1"}, "max_batch_size": 2}"#,
        );
        let env = env_in(
            dir.path(),
            &[
                ("MLSERVER_MODEL_IMPLEMENTATION", "sdserve.StableDiffusion"),
                ("MLSERVER_MODEL_VERSION", "9"),
                ("MLSERVER_MODEL_MAX_BATCH_SIZE", "4"),
                ("MLSERVER_MODEL_MAX_BATCH_TIME", "0.5"),
                ("MLSERVER_MODEL_URI", "weights"),
                ("MLSERVER_MODEL_EXTRA", r#"{"steps": 5}"#),
            ],
        );
        let found = discover_models(dir.path(), &env).unwrap();
        let m = &found.models[0];
        assert!(m.implementation.is_builtin());
        assert_eq!(m.version(), Some("1"));
        assert_eq!(m.max_batch_size, 2);
        assert_eq!(m.max_batch_time, 0.5);
        assert_eq!(m.uri(), dir.path().join("sd/weights"));
        assert_eq!(m.parameters.extra["steps"], 5);
    }

    #[test]
    fn env_only_model() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("empty");
        fs::create_dir(&root).unwrap();
        let env = env_in(
            dir.path(),
            &[
                ("MLSERVER_MODEL_NAME", "envsd"),
                (
                    "MLSERVER_MODEL_IMPLEMENTATION",
                    "runtime.StableDiffusionRuntime",
                ),
                ("MLSERVER_MODEL_VERSION", "3"),
                ("MLSERVER_MODEL_URI", "weights/sd"),
            ],
        );
        let found = discover_models(&root, &env).unwrap();
        assert_eq!(found.models.len(), 1);
        let m = &found.models[0];
        assert_eq!(m.name, "envsd");
        assert_eq!(m.version(), Some("3"));
        assert_eq!(m.origin(), Origin::Environment);
        assert_eq!(
            m.implementation,
            Implementation::PythonClass("runtime.StableDiffusionRuntime".into())
        );
        // Relative to the working directory, as MLServer resolves a uri without a source file.
        assert_eq!(m.uri(), dir.path().join("weights/sd"));
        assert!(
            found
                .notes
                .iter()
                .any(|n| n.contains("built-in diffusers pipeline"))
        );

        // Without MLSERVER_MODEL_URI the model folder is the repository itself.
        let env = env_in(dir.path(), &[("MLSERVER_MODEL_IMPLEMENTATION", "sdserve")]);
        let found = discover_models(&root, &env).unwrap();
        assert_eq!(found.models[0].name, "empty");
        assert_eq!(found.models[0].uri(), root);

        // A name without an implementation is an error, not a silently missing model.
        let env = env_in(dir.path(), &[("MLSERVER_MODEL_NAME", "x")]);
        let err = discover_models(&root, &env).unwrap_err();
        assert!(
            matches!(err, SettingsError::MissingImplementation { .. }),
            "{err}"
        );

        // Nothing configured: no model.
        let found = discover_models(&root, &env_in(dir.path(), &[])).unwrap();
        assert!(found.models.is_empty());
    }

    #[test]
    fn duplicate_names_name_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a/model-settings.json"),
            r#"{"name": "sd", "implementation": "sdserve"}"#,
        );
        write(
            &dir.path().join("b/model-settings.json"),
            r#"{"name": "sd", "implementation": "sdserve"}"#,
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("a/model-settings.json") && text.contains("b/model-settings.json"),
            "{text}"
        );
        // Same name, different versions: fine.
        write(
            &dir.path().join("b/model-settings.json"),
            r#"{"name": "sd", "implementation": "sdserve", "parameters": {"version": "2"}}"#,
        );
        let found = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap();
        assert_eq!(found.models.len(), 2);
    }

    #[test]
    fn malformed_json_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/model-settings.json"),
            "{\n  \"implementation\": \"sdserve\",\n  oops\n}",
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        match &err {
            SettingsError::Json { path, line, .. } => {
                assert!(path.ends_with("sd/model-settings.json"));
                assert_eq!(*line, 3);
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("line 3"), "{err}");

        write(&dir.path().join("settings.json"), "{\"debug\": tru}");
        let err = discover(dir.path(), &env_in(dir.path(), &[]), &no_flags()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("settings.json") && text.contains("line 1"),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"implementation": "sdserve", "parameters": {"version": 3}}"#,
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sd/model-settings.json") && text.contains("`parameters.version`"),
            "{text}"
        );
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"implementation": "sdserve", "max_batch_size": "many"}"#,
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        assert!(err.to_string().contains("`max_batch_size`"), "{err}");
        write(&dir.path().join("sd/model-settings.json"), "[1, 2]");
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn unknown_keys_warn() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"implementation": "sdserve", "max_batch_szie": 3, "parameters": {"custom": 1},
                "warm_workers": true}"#,
        );
        write(&dir.path().join("settings.json"), r#"{"htp_port": 1}"#);
        let loaded = discover(dir.path(), &env_in(dir.path(), &[]), &no_flags()).unwrap();
        let w = &loaded.warnings;
        assert!(
            w.iter()
                .any(|m| m.contains("`max_batch_szie`") && m.contains("`max_batch_size`")),
            "{w:?}"
        );
        assert!(w.iter().any(|m| m.contains("`parameters.custom`")), "{w:?}");
        assert!(w.iter().any(|m| m.contains("`warm_workers`")), "{w:?}");
        assert!(
            w.iter()
                .any(|m| m.contains("`htp_port`") && m.contains("settings.json")),
            "{w:?}"
        );
        assert_eq!(loaded.models[0].parameters.other["custom"], 1);
    }

    #[test]
    fn implementation_errors_name_file_and_value() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"implementation": "mlserver_huggingface.HuggingFaceRuntime"}"#,
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sd/model-settings.json")
                && text.contains("mlserver_huggingface.HuggingFaceRuntime")
                && text.contains("transformers"),
            "{text}"
        );
        write(
            &dir.path().join("sd/model-settings.json"),
            r#"{"name": "sd"}"#,
        );
        let err = discover_models(dir.path(), &env_in(dir.path(), &[])).unwrap_err();
        assert!(
            matches!(err, SettingsError::MissingImplementation { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("sd/model-settings.json"));
    }

    #[test]
    fn server_settings_from_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("settings.json"),
            r#"{"http_port": 9000, "debug": false, "load_models_at_startup": false}"#,
        );
        write(&dir.path().join("sd/model-settings.json"), "broken");
        let env = env_in(
            dir.path(),
            &[("MLSERVER_HTTP_PORT", "1"), ("MLSERVER_GRPC_PORT", "9001")],
        );
        // Models are not read when they are not loaded at startup, as in MLServer.
        let loaded = discover(dir.path(), &env, &no_flags()).unwrap();
        assert_eq!(loaded.server.http_port, 9000);
        assert_eq!(loaded.server.grpc_port, 9001);
        assert!(!loaded.server.debug);
        assert!(loaded.models.is_empty());
        let flags = ServerOverrides {
            http_port: Some(9100),
            load_models_at_startup: Some(true),
            ..Default::default()
        };
        let err = discover(dir.path(), &env, &flags).unwrap_err();
        assert!(matches!(err, SettingsError::Json { .. }), "{err}");
    }

    #[test]
    fn missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = discover(
            &dir.path().join("nope"),
            &env_in(dir.path(), &[]),
            &no_flags(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn symlinks_inside_are_followed_once_and_outside_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let outside = dir.path().join("outside");
        write(&root.join("v3/model-settings.json"), SD);
        symlink(root.join("v3"), root.join("latest")).unwrap();
        write(&outside.join("evil/model-settings.json"), SD);
        symlink(outside.join("evil"), root.join("evil")).unwrap();
        fs::create_dir_all(root.join("sneaky")).unwrap();
        symlink(
            outside.join("evil/model-settings.json"),
            root.join("sneaky/model-settings.json"),
        )
        .unwrap();
        // A loop must not hang the scan.
        symlink(&root, root.join("v3/loop")).unwrap();
        let found = discover_models(&root, &env_in(dir.path(), &[])).unwrap();
        let names: Vec<&str> = found.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["v3"]);
        assert!(
            found
                .warnings
                .iter()
                .any(|w| w.contains("evil") && w.contains("outside")),
            "{:?}",
            found.warnings
        );
        assert!(
            found
                .warnings
                .iter()
                .any(|w| w.contains("sneaky") && w.contains("outside")),
            "{:?}",
            found.warnings
        );
    }

    #[test]
    fn find_model_returns_every_version_of_a_name() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("sd/v1/model-settings.json"),
            r#"{"name": "sd", "implementation": "sdserve", "parameters": {"version": "v1"}}"#,
        );
        write(
            &dir.path().join("sd/v2/model-settings.json"),
            r#"{"name": "sd", "implementation": "sdserve", "parameters": {"version": "v2"}}"#,
        );
        write(&dir.path().join("other/model-settings.json"), "{broken");
        let env = env_in(dir.path(), &[]);
        let found = find_model(dir.path(), "sd", &env).unwrap();
        let versions: Vec<_> = found.models.iter().map(|m| m.version().unwrap()).collect();
        assert_eq!(versions, ["v1", "v2"]);
        assert!(
            found
                .warnings
                .iter()
                .any(|w| w.contains("other/model-settings.json"))
        );
        assert!(
            find_model(dir.path(), "missing", &env)
                .unwrap()
                .models
                .is_empty()
        );
        // The broken file belongs to "other" (its folder's name): asking for it gives the error.
        let err = find_model(dir.path(), "other", &env).unwrap_err();
        assert!(matches!(err, SettingsError::Json { .. }), "{err}");
    }

    #[test]
    fn find_model_refuses_paths_and_links_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        write(&root.join("sd/model-settings.json"), SD);
        write(&dir.path().join("outside/model-settings.json"), SD);
        symlink(dir.path().join("outside"), root.join("outside")).unwrap();
        fs::create_dir_all(root.join("linked")).unwrap();
        symlink(
            dir.path().join("outside/model-settings.json"),
            root.join("linked/model-settings.json"),
        )
        .unwrap();
        let env = env_in(dir.path(), &[]);
        for bad in ["..", "../outside", "/etc", "", ".", "a/b", "a\\b", "x\0"] {
            let err = find_model(&root, bad, &env).unwrap_err();
            assert!(
                matches!(err, SettingsError::InvalidModelName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(
            find_model(&root, "outside", &env)
                .unwrap()
                .models
                .is_empty()
        );
        assert!(find_model(&root, "linked", &env).unwrap().models.is_empty());
        let found = find_model(&root, "sd", &env).unwrap();
        assert_eq!(found.models.len(), 1);
        assert_eq!(found.models[0].uri(), root.join("sd"));
    }

    #[test]
    fn find_model_uses_the_env_model_when_there_are_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_in(
            dir.path(),
            &[
                ("MLSERVER_MODEL_NAME", "envsd"),
                ("MLSERVER_MODEL_IMPLEMENTATION", "sdserve"),
            ],
        );
        assert_eq!(
            find_model(dir.path(), "envsd", &env).unwrap().models.len(),
            1
        );
        assert!(
            find_model(dir.path(), "other", &env)
                .unwrap()
                .models
                .is_empty()
        );
    }
}
