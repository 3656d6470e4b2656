//! One denoising step (UNet, CFG batch) and one VAE decode on a model folder
//! (default `models/tiny-sd1`; set `SDSERVE_BENCH_MODEL` for another one).
//!
//! `cargo bench -p sdserve-benches --bench pipeline`

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use sdserve_pipeline::{LoadOptions, StableDiffusion};

fn model_dir() -> PathBuf {
    std::env::var_os("SDSERVE_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-sd1"))
        })
}

fn bench(c: &mut Criterion) {
    let model = StableDiffusion::load(&model_dir(), LoadOptions::cpu()).expect("model loads");
    let desc = sdserve_generation::Generator::description(&model).clone();
    let device = Device::Cpu;
    let (h, w) = (
        desc.native_height / desc.vae_scale_factor,
        desc.native_width / desc.vae_scale_factor,
    );
    let context = sdserve_pipeline::conditioning::Conditioning::new(
        model
            .encode_prompts(&["", "a red circle on a blue background"])
            .expect("text encoder"),
    );
    let latents = Tensor::randn(0f32, 1.0, (2, desc.latent_channels, h, w), &device)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let name = format!("{}x{}", desc.native_width, desc.native_height);

    c.bench_function(&format!("unet_step_cfg_batch2_{name}"), |b| {
        b.iter(|| model.unet().forward(&latents, 500.0, &context).unwrap())
    });
    let one = latents.narrow(0, 0, 1).unwrap();
    c.bench_function(&format!("vae_decode_{name}"), |b| {
        b.iter(|| model.decode(&one).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
