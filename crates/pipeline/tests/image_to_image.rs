//! Image-to-image against diffusers' `StableDiffusion(XL)Img2ImgPipeline` on the tiny models
//! (`models/reference/img2img/`, made by `models/scripts/make_image_references.py`).
//!
//! Every run is replayed with diffusers' own draws (the encoder's latent sample, the noise
//! `add_noise` used, the ancestral scheduler's noise) and must match its images within 2/255;
//! the encoder's latent distribution must match within 1e-4.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sdserve_generation::{
    GenerationDefaults, GenerationRequest, Generator, ImageTask, Job, LatentsInput, Limits,
    RunToEnd, SizeConditioningInput, StepControl, StopReason,
};
use sdserve_pipeline::image_to_image::image_tensor;
use serde_json::Value;

use common::{
    Replay, assert_within_2, float_diff_255, load_tensors, max_abs, max_u8_diff, model, models,
    reference_rgb8,
};

fn dir() -> PathBuf {
    models().join("reference").join("img2img")
}

fn index(key: &str) -> Value {
    let path = dir().join(key).join("index.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The run's request through the server's own decoding, resizing and validation.
fn job_for(key: &str, run: &Value) -> Job {
    request_for(run)
        .resolve(
            model_of(key).description(),
            &GenerationDefaults::default(),
            &Limits::default(),
            || 0,
        )
        .map(|job| checked_job(run, job))
        .unwrap_or_else(|e| panic!("{key}/{}: {e}", run["name"]))
}

fn checked_job(run: &Value, job: Job) -> Job {
    let [h, w] = [0, 1].map(|i| run["output_size"][i].as_u64().unwrap() as usize);
    assert_eq!((job.settings.height, job.settings.width), (h, w));
    let task = match run.get("masks") {
        Some(_) => ImageTask::Inpaint,
        None => ImageTask::Img2Img,
    };
    assert_eq!(job.settings.image_to_image.map(|m| m.task), Some(task));
    job
}

/// The request a reference run makes, as a client would send it.
fn request_for(run: &Value) -> GenerationRequest {
    let texts = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let files = |v: &Value| -> Vec<Vec<u8>> {
        texts(v)
            .iter()
            .map(|name| std::fs::read(dir().join(name)).unwrap())
            .collect()
    };
    let pair = |name: &str| {
        run["sdxl_inputs"]
            .get(name)
            .map(|v| [0, 1].map(|i| v[i].as_i64().unwrap()))
    };
    GenerationRequest {
        prompts: texts(&run["prompts"]),
        negative_prompts: Some(texts(&run["negative_prompts"])),
        num_inference_steps: run["num_inference_steps"].as_i64(),
        guidance_scale: run["guidance_scale"].as_f64(),
        scheduler: Some(run["scheduler"].as_str().unwrap().to_string()),
        seeds: Some(vec![0]),
        images: Some(files(&run["inputs"])),
        mask_images: run.get("masks").map(files),
        strength: run["strength"].as_f64(),
        sizes: SizeConditioningInput {
            original_size: pair("original_size"),
            crops_coords_top_left: pair("crops_coords_top_left"),
            target_size: pair("target_size"),
            negative_original_size: pair("negative_original_size"),
            negative_crops_coords_top_left: pair("negative_crops_coords_top_left"),
            negative_target_size: pair("negative_target_size"),
        },
        aesthetic_score: run["sdxl_inputs"]["aesthetic_score"].as_f64(),
        negative_aesthetic_score: run["sdxl_inputs"]["negative_aesthetic_score"].as_f64(),
        ..Default::default()
    }
}

/// The loaded model a reference ran on (the plain-UNet inpainting runs used the base models).
fn model_of(key: &str) -> &'static sdserve_pipeline::StableDiffusion {
    model(match key {
        "sd1_inpaint" => "sd1",
        "sd2_inpaint" => "sd2",
        "sdxl_inpaint" => "sdxl",
        other => other,
    })
}

/// Records the progress the pipeline reports.
#[derive(Default)]
struct Progress(Vec<(usize, usize)>);

impl StepControl for Progress {
    fn after_step(&mut self, done: usize, total: usize) -> ControlFlow<StopReason> {
        self.0.push((done, total));
        ControlFlow::Continue(())
    }
}

/// diffusers' draws of a run, in our order: the initial noise (what `add_noise` used, or the
/// pure-noise start), then the encoder's samples and the scheduler's draws as they come.
/// Inpainting on a 4-channel UNet: diffusers also encodes the masked image, which only a
/// 9-channel UNet reads; that draw is skipped here, as the pipeline skips the encoding.
fn recorded_draws(
    key: &str,
    run: &Value,
    arrays: &HashMap<String, Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let Some(all) = arrays.get("draws") else {
        let mut draws = vec![arrays["encoder_noise"].clone()];
        if let Some(steps) = arrays.get("step_noise") {
            draws.extend((0..steps.dim(0).unwrap()).map(|k| steps.get(k).unwrap()));
        }
        return (arrays["noise"].clone(), draws);
    };
    let n = run["noise_draw"].as_u64().unwrap() as usize;
    let skip_masked = index(key)["unet_in_channels"] == 4;
    let draws = (0..all.dim(0).unwrap())
        .filter(|&k| k != n && !(skip_masked && k == n + 1))
        .map(|k| all.get(k).unwrap())
        .collect();
    (all.get(n).unwrap(), draws)
}

/// Replays every run of `key`; returns `(run, max 8-bit diff, max float diff in 1/255)`.
fn replay_all(key: &str) -> Vec<(String, u8, f32)> {
    let sd = model_of(key);
    let mut results = Vec::new();
    for run in index(key)["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let arrays = load_tensors(&dir().join(key).join(format!("{name}.safetensors")));
        let job = job_for(key, run);
        if let Some(recorded) = arrays.get("add_time_ids") {
            // diffusers' rows: the negative ones, then the prompt ones.
            let ids = job.settings.time_ids.expect("SDXL time ids");
            let b = job.images.len();
            let rows: Vec<Vec<f32>> = recorded.to_vec2().unwrap();
            assert_eq!(
                rows[..b],
                vec![ids.row(true); b],
                "{key}/{name}: negative ids"
            );
            assert_eq!(
                rows[b..],
                vec![ids.row(false); b],
                "{key}/{name}: prompt ids"
            );
        }
        let (initial, draws) = recorded_draws(key, run, &arrays);
        let mut replay = Replay { draws, next: 0 };
        let mut progress = Progress::default();
        let images = sd
            .run(&job, &initial, &mut replay, &mut progress)
            .unwrap_or_else(|e| panic!("{key}/{name}: {e}"));
        assert_eq!(
            replay.next,
            replay.draws.len(),
            "{key}/{name}: draws left unused"
        );
        let steps = run["timesteps"].as_array().unwrap().len();
        let expected: Vec<_> = (1..=steps).map(|k| (k, steps)).collect();
        assert_eq!(
            progress.0, expected,
            "{key}/{name}: progress counts the steps that run"
        );

        let float_diff = float_diff_255(&images, &arrays["images"]);
        let theirs: Vec<f32> = arrays["images"].flatten_all().unwrap().to_vec1().unwrap();
        let pixel_diff = (0..images.batch)
            .map(|i| max_u8_diff(&images.rgb8(i), &reference_rgb8(&theirs, &images, i)))
            .max()
            .unwrap_or(0);
        println!(
            "{key}/{name}: max |diff| {pixel_diff}/255 on 8-bit pixels, {float_diff:.4}/255 on floats"
        );
        results.push((format!("{key}/{name}"), pixel_diff, float_diff));
    }
    results
}

fn check_model(key: &str) {
    let results = replay_all(key);
    let at_least = if key.contains("inpaint") {
        // 8 schedulers at strength 1, two at 0.6, a resized image and mask.
        11
    } else {
        // 8 schedulers × 2 strengths + a resized input (SDXL: + size conditioning).
        17
    };
    assert!(results.len() >= at_least, "{} runs", results.len());
    assert_within_2(&results);
}

#[test]
fn sd1_image_to_image_matches_diffusers_for_every_scheduler_and_strength() {
    check_model("sd1");
}

#[test]
fn sd2_image_to_image_matches_diffusers_for_every_scheduler_and_strength() {
    check_model("sd2");
}

#[test]
fn sdxl_image_to_image_matches_diffusers_for_every_scheduler_and_strength() {
    check_model("sdxl");
}

/// An SDXL-refiner-style folder refining tiny-sdxl's own outputs.
#[test]
fn an_sdxl_refiner_matches_diffusers_for_every_scheduler_and_strength() {
    check_model("sdxl_refiner");
}

#[test]
fn inpainting_with_a_plain_unet_matches_diffusers() {
    check_model("sd1_inpaint");
}

#[test]
fn sd2_inpainting_with_a_v_prediction_unet_matches_diffusers() {
    check_model("sd2_inpaint");
}

#[test]
fn inpainting_with_a_nine_channel_unet_matches_diffusers() {
    check_model("sd1_inpaint9");
}

#[test]
fn sdxl_inpainting_matches_diffusers_with_plain_and_nine_channel_unets() {
    check_model("sdxl_inpaint");
    check_model("sdxl_inpaint9");
}

/// diffusers' draws given as the request's `latents` and `encoder_noise` inputs reproduce its
/// images through the seeded path (deterministic schedulers: no step draws).
#[test]
fn explicit_latents_and_encoder_noise_reproduce_diffusers() {
    let cases = [
        ("sd1", "ddim_s0.8"),
        ("sd1_inpaint9", "ddim_s0.6"),
        ("sdxl_inpaint", "unipc_s0.9999"),
    ];
    for (key, name) in cases {
        let run = index(key)["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone();
        let arrays = load_tensors(&dir().join(key).join(format!("{name}.safetensors")));
        let (initial, encoder) = recorded_draws(key, &run, &arrays);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = initial.dim(0).unwrap();
        let latent: Vec<usize> = initial.dims()[1..].to_vec();
        // (encodings, B, ...) -> (B, encodings, ...)
        let per_image: Vec<f32> = (0..b)
            .flat_map(|i| encoder.iter().flat_map(move |d| flat(&d.get(i).unwrap())))
            .collect();
        let mut request = request_for(&run);
        request.latents = Some(LatentsInput {
            shape: initial.dims().to_vec(),
            data: flat(&initial),
        });
        request.encoder_noise = Some(LatentsInput {
            shape: [vec![b, encoder.len()], latent].concat(),
            data: per_image,
        });
        let sd = model_of(key);
        let job = request
            .resolve(
                sd.description(),
                &GenerationDefaults::default(),
                &Limits::default(),
                || 0,
            )
            .unwrap();
        let images = sd.generate_float(&job, &mut RunToEnd).unwrap();
        let theirs: Vec<f32> = flat(&arrays["images"]);
        for i in 0..b {
            let worst = max_u8_diff(&images.rgb8(i), &reference_rgb8(&theirs, &images, i));
            assert!(worst <= 2, "{key}/{name} image {i}: {worst}/255");
        }
    }
}

#[test]
fn the_encoders_latent_distribution_matches_diffusers() {
    for key in ["sd1", "sd2", "sdxl"] {
        let sd = model(key);
        let run = &index(key)["runs"][0];
        let job = job_for(key, run);
        let reference = load_tensors(&dir().join(key).join("encoder.safetensors"));
        let images = image_tensor(&job, &Device::Cpu).unwrap();
        let dist = sd.vae().encode(&images).unwrap();
        let (dm, ds) = (
            max_abs(&dist.mean, &reference["mean"]),
            max_abs(&dist.std, &reference["std"]),
        );
        let eps = load_tensors(
            &dir()
                .join(key)
                .join(format!("{}.safetensors", run["name"].as_str().unwrap())),
        )["encoder_noise"]
            .clone();
        let latents = (dist.sample(&eps).unwrap() * sd.vae().config().scaling_factor).unwrap();
        let dl = max_abs(&latents, &reference["image_latents"]);
        println!("{key}: encoder mean {dm:.2e}, std {ds:.2e}, scaled latents {dl:.2e}");
        assert!(
            dm <= 1e-4 && ds <= 1e-4 && dl <= 1e-4,
            "{key}: {dm} {ds} {dl}"
        );
    }
}
