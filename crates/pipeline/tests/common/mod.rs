//! What the reference tests share: the tiny models (each loaded once per test binary), the
//! reference files, tensor distances and replaying recorded noise.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};
use sdserve_pipeline::image::FloatImages;
use sdserve_pipeline::noise::NoiseSource;
use sdserve_pipeline::{LoadOptions, StableDiffusion};
use serde_json::Value;

pub fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

pub fn model(key: &str) -> &'static StableDiffusion {
    static SD1: OnceLock<StableDiffusion> = OnceLock::new();
    static SD1_INPAINT9: OnceLock<StableDiffusion> = OnceLock::new();
    static SD2: OnceLock<StableDiffusion> = OnceLock::new();
    static SHAPES: OnceLock<StableDiffusion> = OnceLock::new();
    static SDXL: OnceLock<StableDiffusion> = OnceLock::new();
    static SDXL_REFINER: OnceLock<StableDiffusion> = OnceLock::new();
    static SDXL_INPAINT9: OnceLock<StableDiffusion> = OnceLock::new();
    static SD_TURBO: OnceLock<StableDiffusion> = OnceLock::new();
    static SDXL_TURBO: OnceLock<StableDiffusion> = OnceLock::new();
    let (cell, folder) = match key {
        "sd_turbo" => (&SD_TURBO, "tiny-sd-turbo"),
        "sdxl_turbo" => (&SDXL_TURBO, "tiny-sdxl-turbo"),
        "sd1" => (&SD1, "tiny-sd1"),
        "sd1_inpaint9" => (&SD1_INPAINT9, "tiny-sd1-inpaint"),
        "sd2" => (&SD2, "tiny-sd2"),
        "sdxl" => (&SDXL, "tiny-sdxl"),
        "sdxl_refiner" => (&SDXL_REFINER, "tiny-sdxl-refiner"),
        "sdxl_inpaint9" => (&SDXL_INPAINT9, "tiny-sdxl-inpaint"),
        "shapes" => (&SHAPES, "tiny-shapes"),
        _ => unreachable!(),
    };
    cell.get_or_init(|| {
        StableDiffusion::load(&models().join(folder), LoadOptions::cpu())
            .unwrap_or_else(|e| panic!("loading {folder}: {e}"))
    })
}

pub fn reference(key: &str) -> PathBuf {
    models().join("reference").join(key)
}

pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn index(key: &str) -> Value {
    let path = reference(key).join("index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes -Infinity for some scheduler settings.
    sdserve_pipeline::schedulers::parse_python_json(&text).unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Replays recorded scheduler noise draws in order.
pub struct Replay {
    pub draws: Vec<Tensor>,
    pub next: usize,
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        let Some(draw) = self.draws.get(self.next) else {
            candle_core::bail!(
                "the scheduler drew more than the {} recorded noise tensors",
                self.draws.len()
            );
        };
        if draw.shape() != shape {
            candle_core::bail!(
                "draw {} has shape {:?}, the scheduler asked for {shape:?}",
                self.next,
                draw.shape()
            );
        }
        self.next += 1;
        draw.to_device(device)
    }
}

/// The largest difference, in 1/255, between our float images and diffusers' `(B, H, W, 3)`
/// `output_type="np"` array.
pub fn float_diff_255(images: &FloatImages, reference: &Tensor) -> f32 {
    let ours = Tensor::from_vec(
        images.data.clone(),
        (images.batch, 3, images.height, images.width),
        &Device::Cpu,
    )
    .and_then(|t| t.permute((0, 2, 3, 1)))
    .unwrap();
    max_abs(&ours, reference) * 255.0
}

/// diffusers' 8-bit rounding (`numpy_to_pil`) of image `i` of a `(B, H, W, 3)` float array.
pub fn reference_rgb8(reference: &[f32], images: &FloatImages, i: usize) -> Vec<u8> {
    let plane = images.height * images.width * 3;
    reference[i * plane..(i + 1) * plane]
        .iter()
        .map(|x| (x * 255.0).round_ties_even() as u8)
        .collect()
}

/// The largest per-channel difference between two 8-bit images.
pub fn max_u8_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Every `(case, 8-bit diff, float diff)` within 2/255.
pub fn assert_within_2(results: &[(String, u8, f32)]) {
    let failures: Vec<_> = results.iter().filter(|(_, d, _)| *d > 2).collect();
    assert!(failures.is_empty(), "cases over 2/255: {failures:?}");
}
