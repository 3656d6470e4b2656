//! LoRA adapters against diffusers' `load_lora_weights` + `set_adapters` (`models/lora/`,
//! made by `models/scripts/make_tiny_lora.py`) on the tiny SD 1.x, SD 2.x (linear projections,
//! v-prediction) and SDXL models: every recorded run (no adapter, one, two at
//! different scales, scale 0, the kohya file) replayed from the recorded latents, within 2/255
//! of diffusers' images.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sdserve_generation::{
    AdapterChoice, AdapterDeclaration, Generator, ImageSpec, Job, JobSettings, RunToEnd, TimeIds,
};
use sdserve_pipeline::image::{FloatImages, decode_png};
use sdserve_pipeline::{LoadOptions, StableDiffusion};
use serde_json::Value;

use common::{Replay, assert_within_2, float_diff_255, load_tensors, max_u8_diff, models};

fn lora_dir(model: &str) -> PathBuf {
    models().join("lora").join(model)
}

fn index(model: &str) -> Value {
    let path = lora_dir(model).join("index.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The adapter name of a file: its name without `.safetensors` (`style.kohya`).
fn adapter_name(file: &str) -> &str {
    file.trim_end_matches(".safetensors")
}

/// The tiny model with every adapter file of its folder declared (scale 1, not default).
fn load(model: &str) -> StableDiffusion {
    let dir = lora_dir(model);
    let mut adapters = Vec::new();
    for file in [
        "style.safetensors",
        "style.kohya.safetensors",
        "detail.safetensors",
    ] {
        adapters.push(AdapterDeclaration {
            name: adapter_name(file).to_string(),
            path: dir.join(file),
            scale: 1.0,
            default: false,
        });
    }
    let options = LoadOptions {
        adapters,
        ..LoadOptions::cpu()
    };
    StableDiffusion::load(&models().join(format!("tiny-{model}")), options).unwrap()
}

fn job(sd: &StableDiffusion, idx: &Value, run: &Value) -> Job {
    let requested: Vec<(String, Option<f64>)> = run["adapters"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, scale)| {
            let file = run["files"][name].as_str().unwrap();
            (adapter_name(file).to_string(), scale.as_f64())
        })
        .collect();
    let description = sd.description();
    let adapters = AdapterChoice::resolve(Some(&requested), &description.adapters).unwrap();
    let size = idx["height"].as_u64().unwrap() as usize;
    let sdxl = description.family == "sdxl";
    let ids = [size as u32, size as u32, 0, 0, size as u32, size as u32];
    let prompts: Vec<&str> = idx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    Job {
        settings: JobSettings {
            num_inference_steps: idx["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: idx["guidance_scale"].as_f64().unwrap(),
            height: size,
            width: idx["width"].as_u64().unwrap() as usize,
            scheduler: description.default_scheduler.clone(),
            eta: 0.0,
            time_ids: sdxl.then_some(TimeIds {
                positive: ids,
                negative: ids,
                aesthetic: None,
            }),
            image_to_image: None,
            adapters,
        },
        images: prompts
            .iter()
            .map(|p| ImageSpec {
                negative_prompt: idx["negative_prompt"].as_str().map(str::to_string),
                ..ImageSpec::new(*p, 0)
            })
            .collect(),
    }
}

/// The one tensor of a safetensors file.
fn only_tensor(path: &Path) -> Tensor {
    let tensors = load_tensors(path);
    assert_eq!(tensors.len(), 1, "{}", path.display());
    tensors.into_values().next().unwrap()
}

/// Every run of `model`'s index: (run, max 8-bit diff, max float diff), and our images by run.
fn replay(model: &str) -> (Vec<(String, u8, f32)>, HashMap<String, FloatImages>) {
    let sd = load(model);
    let idx = index(model);
    let dir = lora_dir(model);
    let latents = only_tensor(&dir.join(idx["latents"].as_str().unwrap()));
    let mut results = Vec::new();
    let mut ours = HashMap::new();
    for run in idx["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let job = job(&sd, &idx, run);
        // The runs' schedulers are deterministic: a draw fails the run.
        let mut no_draws = Replay {
            draws: Vec::new(),
            next: 0,
        };
        let images = sd
            .run(&job, &latents, &mut no_draws, &mut RunToEnd)
            .unwrap_or_else(|e| panic!("{model}/{name}: {e}"));
        let arrays = load_tensors(&dir.join(run["arrays"].as_str().unwrap()));
        let float_diff = float_diff_255(&images, &arrays["images"]);
        let mut pixel_diff = 0u8;
        for (i, png) in run["images"].as_array().unwrap().iter().enumerate() {
            let bytes = std::fs::read(dir.join(png.as_str().unwrap())).unwrap();
            let (_, _, expected) = decode_png(&bytes).unwrap();
            pixel_diff = pixel_diff.max(max_u8_diff(&images.rgb8(i), &expected));
        }
        println!(
            "{model}/{name}: max |diff| {pixel_diff}/255 on PNG pixels, {float_diff:.4}/255 on float images"
        );
        results.push((format!("{model}/{name}"), pixel_diff, float_diff));
        ours.insert(name.to_string(), images);
    }
    (results, ours)
}

fn check(model: &str) {
    let (results, ours) = replay(model);
    assert_eq!(results.len(), 5, "{model}: every run replayed");
    assert_within_2(&results);
    // Scale 0 is the base model exactly; the adapters do change the images.
    assert_eq!(ours["style_zero"].data, ours["base"].data, "{model}");
    let moved = ours["style"]
        .data
        .iter()
        .zip(&ours["base"].data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved * 255.0 > 20.0,
        "{model}: style moves images by {moved}"
    );
    // The kohya file is the PEFT file in another layout.
    let (kohya, peft) = (&ours["kohya_style_detail"].data, &ours["style_detail"].data);
    let apart = kohya
        .iter()
        .zip(peft)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        apart * 255.0 < 0.01,
        "{model}: kohya and PEFT differ by {apart}"
    );
}

#[test]
fn sd1_adapters_match_diffusers() {
    check("sd1");
}

#[test]
fn sd2_adapters_match_diffusers() {
    check("sd2");
}

#[test]
fn sdxl_adapters_match_diffusers() {
    check("sdxl");
}

#[test]
fn the_model_reports_its_adapters_and_sizes_their_merged_copies() {
    let sd = load("sd1");
    let names: Vec<&str> = sd
        .description()
        .adapters
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["style", "style.kohya", "detail"]);
    let idx = index("sd1");
    let runs = idx["runs"].as_array().unwrap();
    let base = job(&sd, &idx, &runs[0]);
    let styled = job(&sd, &idx, &runs[1]);
    let plain = sd.memory_estimate(&base.settings, 2);
    let adapted = sd.memory_estimate(&styled.settings, 2);
    assert_eq!(plain.adapters, 0);
    assert!(adapted.adapters > 0 && adapted.total() == plain.total() + adapted.adapters);
}
