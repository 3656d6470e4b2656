//! What the reference tests share: the tiny models (each loaded once per test binary), the
//! reference files, tensor distances and replaying recorded noise.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};
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
