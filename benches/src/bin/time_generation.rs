//! Times full generations (text encoder → denoising → VAE → PNG) on a model folder.
//!
//! `cargo run --release -p sdserve-benches --bin time_generation -- models/tiny-sd1 --steps 20 --runs 5`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sdserve_generation::{Generator, ImageSpec, Job, JobSettings, RunToEnd};
use sdserve_pipeline::{LoadOptions, StableDiffusion};

#[derive(Parser)]
struct Args {
    /// A diffusers model folder.
    model: PathBuf,
    #[arg(long, default_value_t = 20)]
    steps: usize,
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
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// `parameters.extra`-style options as JSON, e.g. '{"device": "cuda", "dtype": "f16"}'.
    #[arg(long, default_value = "{}")]
    options: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&args.options).context("--options")?;
    let t0 = Instant::now();
    let model = StableDiffusion::load(&args.model, LoadOptions::from_extra(&extra)?)?;
    let load = t0.elapsed();
    let d = model.description().clone();
    let job = Job {
        settings: JobSettings {
            num_inference_steps: args.steps,
            guidance_scale: args.guidance_scale,
            height: args.height.unwrap_or(d.native_height),
            width: args.width.unwrap_or(d.native_width),
            scheduler: args
                .scheduler
                .clone()
                .unwrap_or(d.default_scheduler.clone()),
            eta: 0.0,
        },
        images: (0..args.batch)
            .map(|i| ImageSpec {
                prompt: "a red circle on a blue background".into(),
                negative_prompt: String::new(),
                seed: i as u64,
                latents: None,
            })
            .collect(),
    };
    println!(
        "model {} ({} {} on {}), load {:.2} s, {}x{}, {} steps, scheduler {}, guidance {}, batch {}",
        args.model.display(),
        d.family,
        d.dtype,
        d.device,
        load.as_secs_f64(),
        job.settings.width,
        job.settings.height,
        job.settings.num_inference_steps,
        job.settings.scheduler,
        job.settings.guidance_scale,
        args.batch
    );
    let warm = Instant::now();
    model.generate(&job, &mut RunToEnd)?;
    println!("warm-up run: {:.3} s", warm.elapsed().as_secs_f64());
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        let images = model.generate(&job, &mut RunToEnd)?;
        anyhow::ensure!(images.len() == args.batch, "expected {} images", args.batch);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    if !times.is_empty() {
        let median = times[times.len() / 2];
        println!(
            "runs {}: min {:.3} s, median {:.3} s, max {:.3} s; {:.2} steps/s; {:.3} s per image",
            times.len(),
            times[0],
            median,
            times[times.len() - 1],
            args.steps as f64 / median,
            median / args.batch as f64
        );
    }
    Ok(())
}
