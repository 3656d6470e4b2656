//! Writes a LoRA adapter with seeded random pairs for a model folder, in the PEFT layout
//! diffusers saves (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`), for
//! timing adapters on models no trained adapter exists for (the random-weight bench models).
//!
//! `cargo run --release -p sdserve-benches --bin make_random_lora -- target/bench-models/sd15-f32 --rank 16 --out target/bench-models/sd15-r16.safetensors`
//!
//! Adapted: every attention projection, feed-forward and `proj_in`/`proj_out` of the UNet's
//! transformer blocks and every attention projection and MLP of the text encoders, the layers
//! a typical kohya or PEFT SD adapter trains. Alpha = rank (scale 1).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Parser;
use sdserve_pipeline::noise::NormalStream;
use sdserve_pipeline::weights::{WeightStore, find_weights};

#[derive(Parser)]
struct Args {
    /// A diffusers model folder.
    model: PathBuf,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave the text encoders out.
    #[arg(long)]
    unet_only: bool,
    #[arg(long)]
    out: PathBuf,
}

/// Module name endings adapted per network.
const UNET_TARGETS: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
];
const TEXT_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut networks = vec![("unet", "diffusion_pytorch_model", UNET_TARGETS)];
    if !args.unet_only {
        for folder in ["text_encoder", "text_encoder_2"] {
            if args.model.join(folder).is_dir() {
                networks.push((folder, "model", TEXT_TARGETS));
            }
        }
    }
    let mut noise = NormalStream::new(args.seed);
    let mut tensors = HashMap::new();
    let mut bytes = 0usize;
    for (folder, stem, targets) in networks {
        let store = WeightStore::open(&find_weights(&args.model.join(folder), stem, false)?)?;
        let mut names: Vec<(String, Vec<usize>)> = store
            .shapes()
            .filter_map(|(n, s)| Some((n.strip_suffix(".weight")?.to_string(), s.to_vec())))
            .filter(|(m, s)| {
                (s.len() == 2 || s.len() == 4)
                    && targets.iter().any(|t| m.ends_with(&format!(".{t}")))
            })
            .collect();
        names.sort();
        for (module, shape) in names {
            let (out, fan_in) = (shape[0], shape[1..].iter().product::<usize>());
            let mut down_shape = vec![args.rank];
            down_shape.extend_from_slice(&shape[1..]);
            let mut up_shape = vec![out, args.rank];
            up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
            let scaled = |v: Vec<f32>, s: f32| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
            let down = scaled(noise.fill(args.rank * fan_in), 1.0 / (fan_in as f32).sqrt());
            let up = scaled(noise.fill(out * args.rank), 0.01);
            bytes += 4 * (down.len() + up.len());
            tensors.insert(
                format!("{folder}.{module}.lora_A.weight"),
                Tensor::from_vec(down, down_shape, &Device::Cpu)?,
            );
            tensors.insert(
                format!("{folder}.{module}.lora_B.weight"),
                Tensor::from_vec(up, up_shape, &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{}: {} layers, rank {}, {:.1} MiB of F32 pairs",
        args.out.display(),
        tensors.len() / 2,
        args.rank,
        bytes as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
