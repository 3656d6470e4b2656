//! The command line. `start`'s flags are generated from the settings table, so `--help`,
//! the README table and the parser cannot drift apart.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use sdserve_settings::{SERVER_SETTINGS, ServerOverrides};

pub enum Invocation {
    Start {
        folder: PathBuf,
        overrides: ServerOverrides,
    },
    Settings,
    MakeRandomModel {
        config: String,
        dtype: String,
        seed: u64,
        tokenizer: PathBuf,
        out: PathBuf,
    },
    CheckKernels {
        device: String,
    },
}

fn flag_id(flag: &str) -> String {
    flag.trim_start_matches("--").replace('-', "_")
}

pub fn command() -> Command {
    let mut start = Command::new("start")
        .about("Serve every model found below FOLDER (model-settings.json files), as `mlserver start` does")
        .long_about(
            "Serve every model found below FOLDER, as `mlserver start` does: FOLDER/settings.json holds server \
             settings, every model-settings.json below it describes a model. Precedence: command-line flag > \
             settings.json > MLSERVER_* environment variable > default.",
        )
        .arg(Arg::new("folder").value_name("FOLDER").required(true).value_parser(clap::value_parser!(PathBuf)));
    for doc in SERVER_SETTINGS {
        let Some(flag) = doc.flag else { continue };
        let long: &'static str = flag.trim_start_matches("--");
        let help = format!(
            "{} [env: {}] [default: {}] [settings.json: {}]",
            doc.description, doc.env, doc.default, doc.key
        );
        start = start.arg(
            Arg::new(flag_id(flag))
                .long(long)
                .value_name("VALUE")
                .help(help)
                .action(ArgAction::Set),
        );
    }
    Command::new("sdserve")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "MLServer-compatible Stable Diffusion inference server (V2 / Open Inference Protocol)",
        )
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(start)
        .subcommand(Command::new("settings").about(
            "Print every server setting: settings.json key, environment variable, flag, default",
        ))
        .subcommand(make_random_model())
        .subcommand(check_kernels())
}

/// Hidden: the GPU benchmark's device test of the attention kernels.
fn check_kernels() -> Command {
    Command::new("check-kernels")
        .hide(true)
        .about(
            "Compare the device's attention kernels with the CPU's on random operands (benchmarks)",
        )
        .arg(
            Arg::new("device")
                .long("device")
                .default_value("cuda")
                .help("cuda, cuda:N or cpu (the CPU's own F16/F32 paths: a dry run)"),
        )
}

/// Hidden: benchmark machines get random-weight models from the one binary they carry.
fn make_random_model() -> Command {
    let path = || {
        Arg::new("x")
            .value_parser(clap::value_parser!(PathBuf))
            .required(true)
    };
    Command::new("make-random-model")
        .hide(true)
        .about(
            "Write a diffusers folder with seeded random weights at a real model size (benchmarks)",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .required(true)
                .help("sd15, sd21 or tiny"),
        )
        .arg(
            Arg::new("dtype")
                .long("dtype")
                .default_value("f16")
                .help("f16, f32 or bf16"),
        )
        .arg(
            Arg::new("seed")
                .long("seed")
                .default_value("0")
                .value_parser(clap::value_parser!(u64)),
        )
        .arg(
            path()
                .id("tokenizer")
                .long("tokenizer")
                .help("CLIP tokenizer folder to copy (vocab.json, merges.txt)"),
        )
        .arg(
            path()
                .id("out")
                .long("out")
                .help("Output folder; must not exist or be empty"),
        )
}

fn get<T: std::str::FromStr>(m: &ArgMatches, flag: &str) -> Result<Option<T>, String> {
    match m.get_one::<String>(&flag_id(flag)) {
        None => Ok(None),
        Some(v) => v
            .parse::<T>()
            .map(Some)
            .map_err(|_| format!("invalid value {v:?} for {flag}")),
    }
}

fn get_bool(m: &ArgMatches, flag: &str) -> Result<Option<bool>, String> {
    match m
        .get_one::<String>(&flag_id(flag))
        .map(|v| v.to_ascii_lowercase())
    {
        None => Ok(None),
        Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(Some(true)),
        Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(Some(false)),
        Some(v) => Err(format!("invalid value {v:?} for {flag}: use true or false")),
    }
}

pub fn parse() -> Result<Invocation, String> {
    let matches = command().get_matches();
    match matches.subcommand() {
        Some(("start", m)) => {
            let folder = m.get_one::<PathBuf>("folder").cloned().unwrap_or_default();
            let overrides = ServerOverrides {
                debug: get_bool(m, "--debug")?,
                parallel_workers: get(m, "--parallel-workers")?,
                load_models_at_startup: get_bool(m, "--load-models-at-startup")?,
                host: get(m, "--host")?,
                http_port: get(m, "--http-port")?,
                grpc_port: get(m, "--grpc-port")?,
                metrics_endpoint: get(m, "--metrics-endpoint")?,
                metrics_port: get(m, "--metrics-port")?,
                metrics_rest_server_prefix: get(m, "--metrics-rest-server-prefix")?,
                max_queue_size: get(m, "--max-queue-size")?,
                request_timeout: get(m, "--request-timeout")?,
                drain_timeout: get(m, "--drain-timeout")?,
                max_request_body_bytes: get(m, "--max-request-body-bytes")?,
                memory_budget: get(m, "--memory-budget")?,
            };
            Ok(Invocation::Start { folder, overrides })
        }
        Some(("settings", _)) => Ok(Invocation::Settings),
        Some(("make-random-model", m)) => Ok(Invocation::MakeRandomModel {
            config: m.get_one::<String>("config").cloned().unwrap_or_default(),
            dtype: m.get_one::<String>("dtype").cloned().unwrap_or_default(),
            seed: m.get_one::<u64>("seed").copied().unwrap_or_default(),
            tokenizer: m
                .get_one::<PathBuf>("tokenizer")
                .cloned()
                .unwrap_or_default(),
            out: m.get_one::<PathBuf>("out").cloned().unwrap_or_default(),
        }),
        Some(("check-kernels", m)) => Ok(Invocation::CheckKernels {
            device: m.get_one::<String>("device").cloned().unwrap_or_default(),
        }),
        _ => Err("unknown command".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_of_the_table_is_parsed() {
        let parsed = [
            "--debug",
            "--parallel-workers",
            "--load-models-at-startup",
            "--host",
            "--http-port",
            "--grpc-port",
            "--metrics-endpoint",
            "--metrics-port",
            "--metrics-rest-server-prefix",
            "--max-queue-size",
            "--request-timeout",
            "--drain-timeout",
            "--max-request-body-bytes",
            "--memory-budget",
        ];
        for doc in SERVER_SETTINGS {
            if let Some(flag) = doc.flag {
                assert!(
                    parsed.contains(&flag),
                    "{flag} is in the table but not parsed"
                );
            }
        }
        command().debug_assert();
    }
}
