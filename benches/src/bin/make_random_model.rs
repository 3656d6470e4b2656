//! Writes a diffusers Stable Diffusion folder with seeded random weights at a real model size.
//!
//! `cargo run --release -p sdserve-benches --bin make_random_model -- --config sd15 --dtype f16 --out DIR`
//! (the same as the hidden `sdserve make-random-model`, with the repository's tokenizers as default).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sdserve_pipeline::random_model::write_named;

#[derive(Parser)]
#[command(about = "Write a diffusers folder with seeded random weights (sd15, sd21, tiny)")]
struct Args {
    /// sd15, sd21 or tiny.
    #[arg(long)]
    config: String,
    /// f16, f32 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokenizer folder to copy (default: the repository's models/tiny-sd1/tokenizer, or
    /// models/tiny-sd2/tokenizer for sd21, which hold the real CLIP vocabularies).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output folder; must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let tokenizer = args.tokenizer.unwrap_or_else(|| {
        let tiny = if args.config == "sd21" {
            "tiny-sd2"
        } else {
            "tiny-sd1"
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(tiny)
            .join("tokenizer")
    });
    match write_named(&args.config, &args.dtype, args.seed, tokenizer, &args.out) {
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
