//! Times full generations (text encoder → denoising → VAE → PNG) on a model folder.
//!
//! `cargo run --release -p sdserve-benches --bin time_generation -- models/tiny-sd1 --steps 20 --runs 5`
//!
//! With `--steps-list 1,3` each step count is timed (one warm-up run first, unless
//! `--no-warm-up`) and `--json` prints `{"seconds": {"1": .., "3": ..}, "peak_rss_bytes": ..}`:
//! the difference between two counts is the cost of a denoising step, with text encoding and VAE
//! decoding cancelled out (`benches/cpu/scaling.py` runs it so). `--stages` times the prompt
//! encoder, one UNet pass and the VAE decoder apart.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sdserve_generation::{
    AdapterChoice, AdapterDeclaration, ConditioningInputs, Generator, ImageSpec, Job, JobSettings,
    RunToEnd, TimeIds,
};
use sdserve_pipeline::conditioning::Conditioning;
use sdserve_pipeline::{LoadOptions, StableDiffusion};

#[derive(Parser)]
struct Args {
    /// A diffusers model folder.
    model: PathBuf,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Step counts to time one after the other (comma-separated); replaces `--steps`.
    #[arg(long, value_delimiter = ',')]
    steps_list: Vec<usize>,
    /// Image size; default: the model's native size.
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Images per generation (one batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Default: the model's own scheduler.
    #[arg(long)]
    scheduler: Option<String>,
    /// Timed runs of each step count, after one warm-up run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip the warm-up run.
    #[arg(long)]
    no_warm_up: bool,
    /// Print one JSON line with the medians and the peak RSS instead of text.
    #[arg(long)]
    json: bool,
    /// Time the stages apart (prompt encoding, one UNet pass, VAE decode), `runs` times each.
    #[arg(long)]
    stages: bool,
    /// `parameters.extra`-style options as JSON, e.g. '{"device": "cuda", "dtype": "f16"}'.
    #[arg(long, default_value = "{}")]
    options: String,
    /// LoRA adapter files (repeatable), all applied to every timed generation at
    /// `--lora-scale`.
    #[arg(long)]
    lora: Vec<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f64,
}

fn job(args: &Args, model: &StableDiffusion, steps: usize) -> Job {
    let d = model.description();
    let (height, width) = (
        args.height.unwrap_or(d.native_height),
        args.width.unwrap_or(d.native_width),
    );
    Job {
        settings: JobSettings {
            num_inference_steps: steps,
            guidance_scale: args.guidance_scale,
            height,
            width,
            scheduler: args
                .scheduler
                .clone()
                .unwrap_or(d.default_scheduler.clone()),
            eta: 0.0,
            time_ids: (d.conditioning == ConditioningInputs::PromptsAndSizes)
                .then(|| TimeIds::defaults(height, width)),
            image_to_image: None,
            adapters: adapters(args, d),
        },
        images: (0..args.batch)
            .map(|i| ImageSpec::new("a red circle on a blue background", i as u64))
            .collect(),
    }
}

/// Every `--lora` file, named by its position, at `--lora-scale`.
fn adapters(args: &Args, d: &sdserve_generation::ModelDescription) -> AdapterChoice {
    let chosen: Vec<(String, Option<f64>)> = (0..args.lora.len())
        .map(|i| (i.to_string(), Some(args.lora_scale)))
        .collect();
    AdapterChoice::resolve(Some(&chosen), &d.adapters).unwrap_or_else(|e| {
        eprintln!("--lora-scale: {e}");
        std::process::exit(2)
    })
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Seconds of each of `runs` calls of `f`.
fn timed(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The prompt encoder, one UNet pass on the CFG batch, and the VAE decoder, each on its own.
fn stages(args: &Args, model: &StableDiffusion) -> anyhow::Result<()> {
    let d = model.description();
    let job = job(args, model, 1);
    let f = d.vae_scale_factor;
    let (h, w) = (job.settings.height / f, job.settings.width / f);
    let prompts = ["", "a red circle on a blue background"];
    let encode = timed(args.runs, || {
        Ok(model.encode_prompts(&prompts).map(drop)?)
    })?;
    let cond = Conditioning::new(model.encode_prompts(&prompts)?);
    let latents = candle_core_tensor(model, (2, d.latent_channels, h, w))?;
    let unet = timed(args.runs, || {
        Ok(model.unet().forward(&latents, 500.0, &cond).map(drop)?)
    })?;
    let one = latents.narrow(0, 0, 1)?;
    let vae = timed(args.runs, || Ok(model.decode(&one).map(drop)?))?;
    let min = |t: &[f64]| t.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{}x{}: prompt encoding {:.3} s, UNet pass (batch 2) {:.3} s, VAE decode {:.3} s (medians of {}; fastest {:.3} / {:.3} / {:.3} s)",
        job.settings.width,
        job.settings.height,
        median(encode.clone()),
        median(unet.clone()),
        median(vae.clone()),
        args.runs.max(1),
        min(&encode),
        min(&unet),
        min(&vae),
    );
    Ok(())
}

/// Deterministic latents of `shape` on the model's device.
fn candle_core_tensor(
    model: &StableDiffusion,
    shape: (usize, usize, usize, usize),
) -> anyhow::Result<sdserve_pipeline::Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let data = sdserve_pipeline::noise::NormalStream::new(0).fill(n);
    Ok(sdserve_pipeline::Tensor::from_vec(
        data,
        shape,
        model.device(),
    )?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: no other thread has started yet.
    unsafe { sdserve_pipeline::prepare_process() };
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&args.options).context("--options")?;
    let t0 = Instant::now();
    let mut options = LoadOptions::from_extra(&extra)?;
    options.adapters = args
        .lora
        .iter()
        .enumerate()
        .map(|(i, path)| AdapterDeclaration {
            name: i.to_string(),
            path: path.clone(),
            scale: 1.0,
            default: false,
        })
        .collect();
    let model = StableDiffusion::load(&args.model, options)?;
    let load = t0.elapsed();
    if args.stages {
        return stages(&args, &model);
    }
    let counts = if args.steps_list.is_empty() {
        vec![args.steps]
    } else {
        args.steps_list.clone()
    };
    let d = model.description().clone();
    let first = job(&args, &model, counts[0]);
    if !args.json {
        println!(
            "model {} ({} {} on {}), load {:.2} s, {}x{}, steps {counts:?}, scheduler {}, guidance {}, batch {}",
            args.model.display(),
            d.family,
            d.dtype,
            d.device,
            load.as_secs_f64(),
            first.settings.width,
            first.settings.height,
            first.settings.scheduler,
            first.settings.guidance_scale,
            args.batch
        );
        if !args.lora.is_empty() {
            let merged = model.memory_estimate(&first.settings, args.batch).adapters;
            println!(
                "{} adapter(s) at scale {}: merged copies up to {:.1} MiB",
                args.lora.len(),
                args.lora_scale,
                merged as f64 / (1u64 << 20) as f64
            );
        }
    }
    if !args.no_warm_up {
        let warm = Instant::now();
        model.generate(&first, &mut RunToEnd)?;
        if !args.json {
            println!("warm-up run: {:.3} s", warm.elapsed().as_secs_f64());
        }
    }
    let mut medians = serde_json::Map::new();
    for &steps in &counts {
        let job = job(&args, &model, steps);
        let times = timed(args.runs, || {
            let images = model.generate(&job, &mut RunToEnd)?;
            anyhow::ensure!(images.len() == args.batch, "expected {} images", args.batch);
            Ok(())
        })?;
        let m = median(times.clone());
        medians.insert(steps.to_string(), m.into());
        if !args.json {
            println!(
                "{steps} steps, runs {}: min {:.3} s, median {m:.3} s, max {:.3} s; {:.2} steps/s; {:.3} s per image",
                times.len(),
                times.iter().copied().fold(f64::INFINITY, f64::min),
                times.iter().copied().fold(0.0, f64::max),
                steps as f64 / m,
                m / args.batch as f64
            );
        }
    }
    let rss = peak_rss();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"seconds": medians, "peak_rss_bytes": rss, "load_seconds": load.as_secs_f64()})
        );
    } else if let Some(rss) = rss {
        println!("peak RSS {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}
