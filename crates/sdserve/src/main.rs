//! sdserve: an MLServer-compatible Stable Diffusion inference server.

mod cli;
mod loader;
mod logging;
mod repository;
mod server;
mod spec;

use std::process::ExitCode;

fn main() -> ExitCode {
    let invocation = match cli::parse() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match invocation {
        cli::Invocation::Settings => {
            print!("{}", sdserve_settings::settings_reference());
            ExitCode::SUCCESS
        }
        cli::Invocation::MakeRandomModel {
            config,
            dtype,
            seed,
            tokenizer,
            out,
        } => make_random_model(&config, &dtype, seed, tokenizer, &out),
        cli::Invocation::CheckKernels { device } => check_kernels(&device),
        cli::Invocation::Start { folder, overrides } => {
            sdserve_engine::panics::install_hook();
            // SAFETY: no other thread has started yet.
            unsafe { sdserve_pipeline::prepare_process() };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sdserve-io")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(server::start(&folder, overrides)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// One JSON line per kernel and shape; fails when any kernel is outside its limit.
fn check_kernels(device: &str) -> ExitCode {
    let extra = serde_json::Map::from_iter([("device".to_string(), serde_json::json!(device))]);
    let checks = sdserve_pipeline::device::LoadOptions::from_extra(&extra)
        .and_then(|o| sdserve_pipeline::device::Placement::resolve(&o))
        .map_err(|e| e.to_string())
        .and_then(|p| {
            sdserve_pipeline::attention::check::check_kernels(&p.device).map_err(|e| e.to_string())
        });
    match checks {
        Ok(checks) => {
            for c in &checks {
                let line = serde_json::json!({
                    "kernel check": c.kernel,
                    "head_dim": c.head_dim,
                    "heads": c.heads,
                    "queries": c.queries,
                    "keys": c.keys,
                    "relative_error": if c.relative_error.is_finite() { serde_json::json!(c.relative_error) } else { serde_json::json!("did not run") },
                    "limit": c.limit,
                    "passed": c.passed(),
                });
                println!("{line}");
            }
            if checks.iter().all(|c| c.passed()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn make_random_model(
    config: &str,
    dtype: &str,
    seed: u64,
    tokenizer: std::path::PathBuf,
    out: &std::path::Path,
) -> ExitCode {
    match sdserve_pipeline::random_model::write_named(config, dtype, seed, tokenizer, out) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
