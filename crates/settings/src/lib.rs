//! Settings exactly as MLServer 1.7.1 reads them: `settings.json` (server), `model-settings.json`
//! (one per model, found recursively below the folder given to `sdserve start`), `MLSERVER_*` and
//! `MLSERVER_MODEL_*` environment variables (and `./.env`), plus sdserve's own settings.
//!
//! Precedence, for every field: command-line flag > file > environment variable > default.
//! Inside nested objects (`parameters`, `cors_settings`) fields the object does not set still
//! come from their variables (`MLSERVER_MODEL_URI`, `MLSERVER_ALLOW_ORIGINS`), as in MLServer.
//!
//! Values are coerced like pydantic's lax mode (`"8080"` is a port, `"yes"` is true); lists and
//! objects in variables are JSON. Every bad value is an error that names its file and key, or its
//! variable and value, or its flag. Unknown keys and settings sdserve accepts but does not
//! implement are warnings.
//!
//! # Modules
//! - [`env`]: the environment (injectable for tests).
//! - [`server`]: [`ServerSettings`], [`ServerOverrides`], the [`SERVER_SETTINGS`] reference table.
//! - [`model`]: [`ModelSettings`], [`ModelParameters`], [`Implementation`], [`MODEL_SETTINGS`].
//! - [`discovery`]: [`discover`], [`discover_models`], [`find_model`].
//! - [`error`]: [`SettingsError`], [`Origin`].
//! - [`extra`]: the `defaults` and `limits` sections of `parameters.extra`.

pub mod discovery;
pub mod env;
pub mod error;
pub mod extra;
pub mod memory_budget;
pub mod model;
pub mod server;
mod value;

pub use discovery::{FoundModels, Loaded, discover, discover_models, find_model};
pub use env::Env;
pub use error::{Origin, SettingsError};
pub use memory_budget::MemoryBudgetSetting;
pub use model::{
    BUILTIN_IMPLEMENTATION, Implementation, MODEL_SETTINGS, MODEL_SETTINGS_FILE, ModelParameters,
    ModelSettings,
};
pub use server::{
    CorsSettings, SDSERVE_VERSION, SERVER_SETTINGS, SETTINGS_FILE, ServerOverrides, ServerSettings,
    SettingDoc, SettingKind, markdown_table, server_setting_doc,
};

/// The settings reference printed by `sdserve settings` and embedded verbatim in README.md.
pub fn settings_reference() -> String {
    format!(
        "Server settings (`settings.json` in the repository folder):\n\n{}\nModel settings (`model-settings.json` next to each model):\n\n{}",
        markdown_table(SERVER_SETTINGS),
        markdown_table(MODEL_SETTINGS)
    )
}
