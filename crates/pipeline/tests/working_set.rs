//! The memory budget's estimate against what a generation really allocates: a counting global
//! allocator measures the heap peak of each generation above what was allocated before it, on
//! the tiny models loaded by the real loading code, at several sizes, batch sizes and tasks.
//! The estimate must never be below the measured peak, and not wildly above it.
//!
//! One test function: the allocator counts every thread of the process, so nothing else may
//! run beside the measurements.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sdserve_generation::{GenerationDefaults, GenerationRequest, Generator, Job, Limits, RunToEnd};
use sdserve_pipeline::{LoadOptions, StableDiffusion};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f` above what was allocated when it began.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

fn models() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// A PNG of `size × size`, for image-to-image.
fn png(size: usize) -> Vec<u8> {
    let rgb: Vec<u8> = (0..size * size * 3).map(|i| (i % 251) as u8).collect();
    sdserve_pipeline::image::encode_png(size, size, &rgb).unwrap()
}

struct Case {
    size: i64,
    images: i64,
    guidance: f64,
    image_to_image: bool,
}

fn job(model: &StableDiffusion, case: &Case) -> Job {
    let request = GenerationRequest {
        prompts: vec!["a red circle".into()],
        num_inference_steps: Some(2),
        guidance_scale: Some(case.guidance),
        height: Some(case.size),
        width: Some(case.size),
        seeds: Some(vec![7]),
        num_images_per_prompt: Some(case.images),
        images: case
            .image_to_image
            .then(|| vec![png(case.size as usize); case.images as usize]),
        strength: case.image_to_image.then_some(1.0),
        ..Default::default()
    };
    let limits = Limits {
        max_pixels: 4096 * 4096,
        ..Limits::default()
    };
    request
        .resolve(
            model.description(),
            &GenerationDefaults::default(),
            &limits,
            || 0,
        )
        .unwrap()
}

#[test]
fn the_estimate_bounds_the_measured_peak_closely() {
    let cases = [
        (
            "tiny-sd1",
            vec![
                (256, 1, 7.5, false),
                (512, 4, 7.5, false),
                (768, 1, 7.5, false),
                (512, 1, 7.5, true),
            ],
        ),
        ("tiny-sdxl", vec![(512, 2, 5.0, false)]),
        ("tiny-shapes", vec![(512, 1, 7.5, false)]),
    ];
    let mut rows = Vec::new();
    for (folder, sizes) in cases {
        let model = StableDiffusion::load(&models().join(folder), LoadOptions::cpu()).unwrap();
        // A first run leaves lazily built tables and small kernel buffers in place.
        let warm = Case {
            size: 64,
            images: 1,
            guidance: 7.5,
            image_to_image: false,
        };
        model.generate(&job(&model, &warm), &mut RunToEnd).unwrap();
        for (size, images, guidance, image_to_image) in sizes {
            let case = Case {
                size,
                images,
                guidance,
                image_to_image,
            };
            let job = job(&model, &case);
            let estimate = model.memory_estimate(&job.settings, job.images.len());
            let run = || {
                peak_of(|| {
                    model.generate(&job, &mut RunToEnd).unwrap();
                })
            };
            // The first run of a size grows the kernels' per-thread buffers; the second finds
            // them in place.
            let (cold, warm) = (run(), run());
            let mib = |b: usize| b as f64 / 1048576.0;
            eprintln!(
                "{folder} {size}² × {images} (guidance {guidance}, image-to-image {image_to_image}): \
                 first run {:.1} MiB (estimate {:.1} MiB), again {:.1} MiB (estimate without the \
                 kept buffers {:.1} MiB)",
                mib(cold),
                mib(estimate.total() as usize),
                mib(warm),
                mib(estimate.stages as usize),
            );
            rows.push((folder, size, images, cold, warm, estimate));
        }
    }
    for (folder, size, images, cold, warm, estimate) in rows {
        let case = format!("{folder} {size}² × {images}");
        assert!(
            cold <= estimate.total() as usize,
            "{case}: first run {cold} bytes, estimate {estimate:?}"
        );
        let ratio = estimate.stages as f64 / warm as f64;
        assert!(
            (1.0..2.0).contains(&ratio),
            "{case}: estimate / measured = {ratio:.2} ({estimate:?}, {warm} bytes)"
        );
    }
}
