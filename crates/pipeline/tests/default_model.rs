//! The default model (`models/tiny-shapes`) draws what the prompt asks for.
//!
//! Eight colour × shape prompts, each on a stated background, run through the real loading
//! code on the model's default settings (`model-settings.json`) with fixed seeds. Each picture
//! is checked by simple image analysis: the background is the median colour of a ring near the
//! border, the object the largest connected region of pixels nearer its own colour than the
//! background's; its colour is the nearest palette colour, its shape follows from how much of
//! its bounding box it fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2). At least 7 of 8 must
//! match colour, shape and background.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sdserve_generation::{Generator, ImageSpec, Job, JobSettings, RunToEnd};
use sdserve_pipeline::image::decode_png;
use sdserve_pipeline::{LoadOptions, StableDiffusion};
use serde_json::Value;

/// The dataset's palette (`models/scripts/shapes_dataset.py`).
const PALETTE: [(&str, [f64; 3]); 8] = [
    ("red", [215.0, 25.0, 30.0]),
    ("green", [30.0, 160.0, 50.0]),
    ("blue", [35.0, 70.0, 225.0]),
    ("yellow", [250.0, 220.0, 30.0]),
    ("white", [245.0, 245.0, 245.0]),
    ("black", [20.0, 20.0, 20.0]),
    ("purple", [130.0, 40.0, 180.0]),
    ("orange", [250.0, 125.0, 10.0]),
];

/// (colour, shape, background): four colours, three shapes; image `i` uses seed `SEED_BASE + i`.
const PROMPTS: [(&str, &str, &str); 8] = [
    ("red", "circle", "white"),
    ("green", "square", "black"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"),
    ("red", "square", "blue"),
    ("green", "triangle", "white"),
    ("blue", "circle", "orange"),
    ("yellow", "square", "black"),
];
const SEED_BASE: u64 = 1;
const REQUIRED: usize = 7;

/// Pixels this far (RGB distance) from the background seed the object.
const FOREGROUND_DISTANCE: f64 = 60.0;
/// Ignored frame: decoders leave faint artefacts at the very edge.
const MARGIN: usize = 2;
const SQUARE_MIN: f64 = 0.89;
const TRIANGLE_MAX: f64 = 0.65;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-shapes")
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn prompt_text(colour: &str, shape: &str, background: &str) -> String {
    format!(
        "{} {colour} {shape} on {} {background} background",
        article(colour),
        article(background)
    )
}

fn nearest_colour(rgb: [f64; 3]) -> &'static str {
    let dist = |c: &[f64; 3]| (0..3).map(|k| (c[k] - rgb[k]).powi(2)).sum::<f64>();
    PALETTE
        .iter()
        .min_by(|a, b| dist(&a.1).total_cmp(&dist(&b.1)))
        .unwrap()
        .0
}

fn median_rgb(pixels: impl Iterator<Item = [f64; 3]>) -> [f64; 3] {
    let mut channels: [Vec<f64>; 3] = Default::default();
    for p in pixels {
        for k in 0..3 {
            channels[k].push(p[k]);
        }
    }
    channels.map(|mut c| {
        c.sort_by(f64::total_cmp);
        let n = c.len();
        if n % 2 == 1 {
            c[n / 2]
        } else {
            (c[n / 2 - 1] + c[n / 2]) / 2.0
        }
    })
}

/// The largest 4-connected component of `mask` (row-major, `w` × `h`).
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut label = vec![0u32; mask.len()];
    let (mut best, mut best_size, mut current) = (0u32, 0usize, 0u32);
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        current += 1;
        label[start] = current;
        let (mut stack, mut size) = (vec![start], 0usize);
        while let Some(i) = stack.pop() {
            size += 1;
            let (y, x) = (i / w, i % w);
            let mut visit = |j: usize| {
                if mask[j] && label[j] == 0 {
                    label[j] = current;
                    stack.push(j);
                }
            };
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
        }
        if size > best_size {
            (best, best_size) = (current, size);
        }
    }
    label.iter().map(|&l| best != 0 && l == best).collect()
}

#[derive(Debug)]
struct Analysis {
    background: &'static str,
    colour: Option<&'static str>,
    shape: Option<&'static str>,
    fill: f64,
}

fn analyse(rgb: &[u8], w: usize, h: usize) -> Analysis {
    let px = |i: usize| {
        [
            rgb[3 * i] as f64,
            rgb[3 * i + 1] as f64,
            rgb[3 * i + 2] as f64,
        ]
    };
    let m = MARGIN;
    let inner = |i: usize| {
        let (y, x) = (i / w, i % w);
        y >= m && y < h - m && x >= m && x < w - m
    };
    // A 2-pixel ring just inside the ignored frame.
    let ring = |i: usize| {
        let (y, x) = (i / w, i % w);
        inner(i) && (y < m + 2 || y >= h - m - 2 || x < m + 2 || x >= w - m - 2)
    };
    let bg = median_rgb((0..w * h).filter(|&i| ring(i)).map(px));
    let mut out = Analysis {
        background: nearest_colour(bg),
        colour: None,
        shape: None,
        fill: 0.0,
    };

    let dist = |p: [f64; 3]| (0..3).map(|k| (p[k] - bg[k]).powi(2)).sum::<f64>().sqrt();
    let far: Vec<bool> = (0..w * h)
        .map(|i| inner(i) && dist(px(i)) > FOREGROUND_DISTANCE)
        .collect();
    if far.iter().filter(|&&f| f).count() < 20 {
        return out;
    }
    let seed = largest_component(&far, w, h);
    let fg = median_rgb((0..w * h).filter(|&i| seed[i]).map(px));
    // Nearer the object's colour than the background's: projection onto bg -> fg past 1/2.
    let axis = [fg[0] - bg[0], fg[1] - bg[1], fg[2] - bg[2]];
    let norm = axis.iter().map(|a| a * a).sum::<f64>().max(1e-9);
    let near: Vec<bool> = (0..w * h)
        .map(|i| {
            let p = px(i);
            inner(i) && (0..3).map(|k| (p[k] - bg[k]) * axis[k]).sum::<f64>() / norm > 0.5
        })
        .collect();
    let object = largest_component(&near, w, h);
    let idx: Vec<usize> = (0..w * h).filter(|&i| object[i]).collect();
    let (ys, xs): (Vec<usize>, Vec<usize>) = idx.iter().map(|&i| (i / w, i % w)).unzip();
    let height = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
    let width = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
    out.fill = idx.len() as f64 / (height * width) as f64;
    out.colour = Some(nearest_colour(median_rgb(idx.iter().map(|&i| px(i)))));
    out.shape = Some(if out.fill > SQUARE_MIN {
        "square"
    } else if out.fill < TRIANGLE_MAX {
        "triangle"
    } else {
        "circle"
    });
    out
}

/// `parameters.extra.defaults` of the model's `model-settings.json`.
fn defaults(dir: &Path) -> (usize, f64, String) {
    let path = dir.join("model-settings.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d = &v["parameters"]["extra"]["defaults"];
    let steps = d["num_inference_steps"]
        .as_u64()
        .expect("defaults.num_inference_steps") as usize;
    let guidance = d["guidance_scale"]
        .as_f64()
        .expect("defaults.guidance_scale");
    let scheduler = d["scheduler"]
        .as_str()
        .expect("defaults.scheduler")
        .to_string();
    (steps, guidance, scheduler)
}

#[test]
fn analysis_reads_drawn_shapes() {
    // Synthetic pictures: the analysis itself must tell the three shapes and colours apart.
    let (w, h) = (64usize, 64usize);
    let draw = |inside: &dyn Fn(f64, f64) -> bool, fg: [u8; 3], bg: [u8; 3]| -> Vec<u8> {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(if inside(x as f64 + 0.5, y as f64 + 0.5) {
                    &fg
                } else {
                    &bg
                });
            }
        }
        rgb
    };
    let circle = |x: f64, y: f64| (x - 30.0).powi(2) + (y - 34.0).powi(2) < 14.0f64.powi(2);
    let square = |x: f64, y: f64| (12.0..40.0).contains(&x) && (20.0..48.0).contains(&y);
    let triangle =
        |x: f64, y: f64| (10.0..40.0).contains(&y) && (x - 32.0).abs() < (y - 10.0) / 2.0;
    type Case<'a> = (
        &'a dyn Fn(f64, f64) -> bool,
        [u8; 3],
        [u8; 3],
        &'a str,
        &'a str,
        &'a str,
    );
    let cases: [Case; 3] = [
        (
            &circle,
            [215, 25, 30],
            [245, 245, 245],
            "red",
            "circle",
            "white",
        ),
        (
            &square,
            [30, 160, 50],
            [20, 20, 20],
            "green",
            "square",
            "black",
        ),
        (
            &triangle,
            [35, 70, 225],
            [250, 220, 30],
            "blue",
            "triangle",
            "yellow",
        ),
    ];
    for (inside, fg, bg, colour, shape, background) in cases {
        let a = analyse(&draw(inside, fg, bg), w, h);
        assert_eq!(
            (a.colour, a.shape, a.background),
            (Some(colour), Some(shape), background),
            "{a:?}"
        );
    }
    // A plain picture has no object.
    let a = analyse(&draw(&|_, _| false, [0, 0, 0], [35, 70, 225]), w, h);
    assert_eq!((a.colour, a.shape, a.background), (None, None, "blue"));
}

#[test]
fn default_model_draws_the_prompt() {
    let dir = model_dir();
    let started = Instant::now();
    let model = StableDiffusion::load(&dir, LoadOptions::cpu())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let loaded = started.elapsed();
    let (steps, guidance, scheduler) = defaults(&dir);
    let desc = model.description();
    let (height, width) = (desc.native_height, desc.native_width);
    // One job per prompt, as the server runs one request: the time per image is what a user waits.
    let jobs: Vec<Job> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, (c, s, b))| Job {
            settings: JobSettings {
                num_inference_steps: steps,
                guidance_scale: guidance,
                height,
                width,
                scheduler: scheduler.clone(),
                eta: 0.0,
                time_ids: None,
                image_to_image: None,
                adapters: sdserve_generation::AdapterChoice::none(),
            },
            images: vec![ImageSpec::new(prompt_text(c, s, b), SEED_BASE + i as u64)],
        })
        .collect();
    let started = Instant::now();
    let images: Vec<_> = jobs
        .iter()
        .map(|job| {
            model
                .generate(job, &mut RunToEnd)
                .expect("generation")
                .remove(0)
        })
        .collect();
    let generated = started.elapsed();
    println!(
        "tiny-shapes: loaded in {loaded:.2?}; {} images {width}x{height}, {steps} steps {scheduler}, guidance {guidance}: {generated:.2?} ({:.2?} per image)",
        images.len(),
        generated / images.len() as u32
    );

    println!(
        "{:<3} {:<46} {:<8} {:<9} {:>5} {:<8} match",
        "#", "prompt", "colour", "shape", "fill", "bg"
    );
    let mut matches = 0;
    for (i, ((colour, shape, background), image)) in PROMPTS.iter().zip(&images).enumerate() {
        let (w, h, rgb) = decode_png(&image.png).expect("decoding the PNG");
        assert_eq!((w, h), (width, height));
        let a = analyse(&rgb, w, h);
        let ok =
            a.colour == Some(*colour) && a.shape == Some(*shape) && a.background == *background;
        matches += ok as usize;
        println!(
            "{:<3} {:<46} {:<8} {:<9} {:>5.2} {:<8} {}",
            i,
            jobs[i].images[0].prompt,
            a.colour.unwrap_or("-"),
            a.shape.unwrap_or("-"),
            a.fill,
            a.background,
            if ok { "yes" } else { "NO" }
        );
    }
    println!(
        "{matches}/{} match (at least {REQUIRED} required)",
        PROMPTS.len()
    );
    assert!(
        matches >= REQUIRED,
        "only {matches} of {} pictures match their prompt (need {REQUIRED})",
        PROMPTS.len()
    );
}
