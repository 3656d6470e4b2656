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
