//! Times the pipeline's attention on one shape: the fastest of `--runs` calls.
//!
//!     target/release/attention_bench --batch 2 --tokens 4096 --heads 8 --head-dim 40
//!
//! `--keys` sets the key length for cross-attention (default: self-attention, keys = tokens).

use std::time::Instant;

use clap::Parser;
use sdserve_pipeline::{Device, Tensor, noise::NormalStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    tokens: usize,
    #[arg(long)]
    keys: Option<usize>,
    #[arg(long)]
    heads: usize,
    #[arg(long)]
    head_dim: usize,
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

fn random(seed: u64, shape: (usize, usize, usize)) -> anyhow::Result<Tensor> {
    let data = NormalStream::new(seed).fill(shape.0 * shape.1 * shape.2);
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let width = a.heads * a.head_dim;
    let keys = a.keys.unwrap_or(a.tokens);
    let q = random(1, (a.batch, a.tokens, width))?;
    let k = random(2, (a.batch, keys, width))?;
    let v = random(3, (a.batch, keys, width))?;
    let scale = (a.head_dim as f64).powf(-0.5);
    let mut best = f64::INFINITY;
    for _ in 0..a.runs.max(1) {
        let start = Instant::now();
        sdserve_pipeline::attention::attention(
            &q,
            &k,
            &v,
            a.heads,
            scale,
            false,
            sdserve_pipeline::attention::Scores::Operands,
        )?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "attention batch {} tokens {} keys {keys} heads {} head_dim {}: {best:.4} s",
        a.batch, a.tokens, a.heads, a.head_dim
    );
    Ok(())
}
