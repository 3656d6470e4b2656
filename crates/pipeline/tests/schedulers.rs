//! The schedulers against diffusers 0.42.1 references made by
//! `models/scripts/make_scheduler_references.py` (see `tests/fixtures/schedulers/`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use sdserve_pipeline::noise::NoiseSource;
use sdserve_pipeline::schedulers::{
    SchedulerConfig, SchedulerError, SchedulerKind, parse_python_json,
};
use serde_json::{Value, json};

/// Largest relative deviation (max |ours - diffusers| / max |diffusers| per tensor) accepted.
const TOLERANCE: f64 = 1e-5;

/// Zero-terminal-SNR configs of the sigma-space schedulers start at sigma = 4096, and the first
/// step shrinks the latents ~400x by cancellation; diffusers' own float32 rounding there is
/// ~2e-5 of the result (a float64 evaluation of the same step differs from it by as much, and
/// the result moves that much with the last bit of sigma_max). These are held to the tolerance
/// relative to the largest magnitude of the trajectory, and to 10x it per tensor.
const ILL_CONDITIONED: [&str; 2] = ["euler_zsnr_trailing_v_8", "euler_a_zsnr_8"];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

struct Fixtures {
    manifest: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixtures() -> Fixtures {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    let manifest = parse_python_json(&text).expect("cases.json parses");
    let tensors = candle_core::safetensors::load(dir.join("references.safetensors"), &Device::Cpu)
        .expect("references");
    Fixtures { manifest, tensors }
}

/// Hands out the noise diffusers drew, in order.
struct Replay {
    draws: Vec<Tensor>,
    used: usize,
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &Shape, _device: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.draws.get(self.used) else {
            candle_core::bail!(
                "more noise draws than diffusers made ({})",
                self.draws.len()
            );
        };
        if t.shape() != shape {
            candle_core::bail!(
                "noise draw {} has shape {:?}, asked for {shape:?}",
                self.used,
                t.shape()
            );
        }
        self.used += 1;
        Ok(t.clone())
    }
}

fn model_output(x_in: &Tensor, k: usize, model: &Value) -> Tensor {
    let f = |key: &str| model[key].as_f64().unwrap();
    let n = x_in.elem_count();
    let base: Vec<f32> = (0..n)
        .map(|i| (f("freq_i") * i as f64 + f("freq_k") * k as f64).sin() as f32)
        .collect();
    let base = Tensor::from_vec(base, x_in.shape(), x_in.device()).unwrap();
    let x = x_in.to_dtype(DType::F32).unwrap();
    (x.affine(f("a"), 0.0).unwrap() + base.affine(f("b"), 0.0).unwrap())
        .unwrap()
        .to_dtype(x_in.dtype())
        .unwrap()
}

/// `(max |ours - reference|, max |reference|)`; the difference is infinite if ours is not finite.
fn deviation(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    let a: Vec<f32> = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if a.iter().any(|v| !v.is_finite()) {
        (f64::INFINITY, scale)
    } else {
        (diff, scale)
    }
}

/// `err <= tolerance`, false for NaN.
fn within(err: f64, tolerance: f64) -> bool {
    err <= tolerance
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let (diff, scale) = deviation(ours, reference);
    diff / scale.max(1e-30)
}

fn timestep_tolerance(t: f64) -> f64 {
    1e-5 + 1e-6 * t.abs()
}

/// Max |a - b| over the timesteps, checking each against `timestep_tolerance`.
fn check_close_timesteps(what: &str, got: &[f64], expected: &[f64]) -> f64 {
    assert!(
        got.iter().all(|t| *t as f32 as f64 == *t),
        "{what}: timesteps must be float32 values"
    );
    let mut worst = 0f64;
    for (a, b) in got.iter().zip(expected) {
        let d = (a - b).abs();
        assert!(
            d <= timestep_tolerance(*b),
            "{what}: timestep {a} vs diffusers {b}"
        );
        worst = worst.max(d);
    }
    worst
}

fn f32_ulps(a: f64, b: f64) -> u32 {
    let (a, b) = (a as f32, b as f32);
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

fn build_case(case: &Value) -> Box<dyn sdserve_pipeline::schedulers::Scheduler> {
    let name = case["name"].as_str().unwrap();
    let mut cfg = SchedulerConfig::from_json(case["config"].clone())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    if case["pipeline_fixups"].as_bool().unwrap() {
        cfg.apply_pipeline_fixups();
    }
    let kind = SchedulerKind::from_name(case["kind"].as_str().unwrap()).unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    cfg.build(kind, steps, case["eta"].as_f64().unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Euler and LMS turn Karras/exponential sigmas back into fractional timesteps through
/// `log(sigmas)`, where diffusers' sigmas come from torch's float32 sqrt (MKL, not correctly
/// rounded) and the log from numpy's float32 SIMD log (not correctly rounded either, and
/// platform-dependent). Those timesteps agree to `timestep_tolerance`, not bit for bit; every
/// other timestep must be equal.
fn sigma_derived_float_timesteps(kind: &str, expected: &[f64]) -> bool {
    matches!(kind, "euler" | "lms") && expected.iter().any(|t| t.fract() != 0.0)
}

#[test]
fn trajectories_match_diffusers() {
    let fx = fixtures();
    let model = &fx.manifest["model"];
    let init = &fx.tensors["init"];
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut close_timesteps = Vec::new();
    let mut failures = Vec::new();
    let cases = fx.manifest["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let kind = case["kind"].as_str().unwrap();
        let mut sched = build_case(case);

        let expected: Vec<f64> = fx.tensors[&format!("{name}/timesteps")].to_vec1().unwrap();
        let got = sched.timesteps().to_vec();
        assert_eq!(got.len(), expected.len(), "{name}: number of timesteps");
        if sigma_derived_float_timesteps(kind, &expected) {
            let d = check_close_timesteps(name, &got, &expected);
            close_timesteps.push((name.to_string(), d));
        } else {
            assert_eq!(got, expected, "{name}: timesteps");
        }
        // Sigmas go through torch's float32 sqrt (MKL on x86, not correctly rounded), so the
        // largest sigma may differ by one ulp.
        let sigma = case["init_noise_sigma"].as_f64().unwrap();
        let ulps = f32_ulps(sched.init_noise_sigma(), sigma);
        assert!(
            ulps <= 1,
            "{name}: init_noise_sigma {} vs {sigma}",
            sched.init_noise_sigma()
        );

        let draws = fx
            .tensors
            .get(&format!("{name}/noise"))
            .map(|t| t.chunk(t.dim(0).unwrap(), 0).unwrap());
        let draws: Vec<Tensor> = draws
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.squeeze(0).unwrap())
            .collect();
        let n_draws = draws.len();
        let mut noise = Replay { draws, used: 0 };
        let scaled_ref = &fx.tensors[&format!("{name}/scaled")];
        let prev_ref = &fx.tensors[&format!("{name}/prev")];
        let mut x = init.affine(sched.init_noise_sigma(), 0.0).unwrap();
        // Two measures per case: relative to each reference tensor, and relative to the largest
        // magnitude the trajectory has held so far (float32 rounding scales with it).
        let mut case_err = 0f64;
        let mut running_err = 0f64;
        let mut running_scale = deviation(&x, &x).1;
        for k in 0..got.len() {
            let x_in = sched.scale_model_input(&x, k).unwrap();
            case_err = case_err.max(rel_err(&x_in, &scaled_ref.get(k).unwrap()));
            let mo = model_output(&x_in, k, model);
            x = sched
                .step(&mo, k, &x, &mut noise)
                .unwrap_or_else(|e| panic!("{name}: step {k}: {e}"));
            let (diff, scale) = deviation(&x, &prev_ref.get(k).unwrap());
            running_scale = running_scale.max(scale);
            case_err = case_err.max(diff / scale.max(1e-30));
            running_err = running_err.max(diff / running_scale);
        }
        assert_eq!(noise.used, n_draws, "{name}: noise draws");
        let ill_conditioned = ILL_CONDITIONED.contains(&name);
        if ill_conditioned {
            if !(within(running_err, TOLERANCE) && within(case_err, 10.0 * TOLERANCE)) {
                failures.push(format!(
                    "{name}: relative error {case_err:.2e}, to the running scale {running_err:.2e}"
                ));
            }
            println!(
                "{name}: relative error {case_err:.2e}, to the running scale {running_err:.2e}"
            );
        } else if !within(case_err, TOLERANCE) {
            failures.push(format!("{name}: relative error {case_err:.2e}"));
        }
        if !ill_conditioned {
            let entry = worst.entry(kind.to_string()).or_default();
            *entry = entry.max(case_err);
        }
    }
    for (kind, err) in &worst {
        println!("{kind:>16}: max relative deviation {err:.2e}");
    }
    let inexact = close_timesteps.iter().filter(|(_, d)| *d > 0.0).count();
    let max_dt = close_timesteps.iter().fold(0f64, |m, (_, d)| m.max(*d));
    println!(
        "sigma-derived float timesteps: {} cases, {inexact} not bit-equal, max |dt| {max_dt:.2e}",
        close_timesteps.len()
    );
    assert!(
        failures.is_empty(),
        "{} cases off:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        worst.len(),
        SchedulerKind::all().len(),
        "every kind has reference cases"
    );
}

#[test]
fn timestep_tables_match_diffusers() {
    let fx = fixtures();
    let mut checked = 0;
    let mut max_dt = 0f64;
    for table in fx.manifest["tables"].as_array().unwrap() {
        let kind_name = table["kind"].as_str().unwrap();
        let kind = SchedulerKind::from_name(kind_name).unwrap();
        let cfg = SchedulerConfig::from_json(table["config"].clone()).unwrap();
        let all: Vec<f32> = fx.tensors[table["tensor"].as_str().unwrap()]
            .to_vec1()
            .unwrap();
        let errors: Vec<u64> = table["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mut offset = 0;
        let steps = table["steps"].as_array().unwrap();
        let lengths = table["lengths"].as_array().unwrap();
        for (n, len) in steps.iter().zip(lengths) {
            let (n, len) = (n.as_u64().unwrap() as usize, len.as_u64().unwrap() as usize);
            let what = format!("{} {kind_name} {n} steps", table["name"]);
            if errors.contains(&(n as u64)) {
                let err = cfg
                    .build(kind, n, 0.0)
                    .err()
                    .unwrap_or_else(|| panic!("{what}: diffusers fails, we did not"));
                assert!(
                    matches!(err, SchedulerError::InvalidSteps { .. }),
                    "{what}: {err}"
                );
                continue;
            }
            let expected: Vec<f64> = all[offset..offset + len]
                .iter()
                .map(|&v| v as f64)
                .collect();
            offset += len;
            let sched = cfg
                .build(kind, n, 0.0)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = sched.timesteps();
            assert_eq!(got.len(), expected.len(), "{what}: number of timesteps");
            if sigma_derived_float_timesteps(kind_name, &expected) {
                max_dt = max_dt.max(check_close_timesteps(&what, got, &expected));
            } else {
                assert_eq!(got, &expected[..], "{what}");
            }
            checked += 1;
        }
        assert_eq!(offset, all.len());
    }
    println!("{checked} step counts checked; sigma-derived float timesteps max |dt| {max_dt:.2e}");
    assert!(checked > 1000, "only {checked} tables checked");
}

#[test]
fn half_precision_samples_keep_their_dtype_and_track_the_reference() {
    let fx = fixtures();
    let model = &fx.manifest["model"];
    let wanted = [
        "sd15_old_pndm_10",
        "sd15_old_euler_ancestral_10",
        "sd15_old_dpmpp_2m_karras_25",
        "ddim_sd21v_10",
    ];
    for case in fx.manifest["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if !wanted.contains(&name) {
            continue;
        }
        let mut sched = build_case(case);
        let draws = fx
            .tensors
            .get(&format!("{name}/noise"))
            .map(|t| t.chunk(t.dim(0).unwrap(), 0).unwrap());
        let draws = draws
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.squeeze(0).unwrap())
            .collect();
        let mut noise = Replay { draws, used: 0 };
        let mut x = fx.tensors["init"]
            .affine(sched.init_noise_sigma(), 0.0)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let prev_ref = &fx.tensors[&format!("{name}/prev")];
        let n = sched.timesteps().len();
        for k in 0..n {
            let x_in = sched.scale_model_input(&x, k).unwrap();
            assert_eq!(x_in.dtype(), DType::F16);
            let mo = model_output(&x_in, k, model);
            x = sched.step(&mo, k, &x, &mut noise).unwrap();
            assert_eq!(x.dtype(), DType::F16);
        }
        let e = rel_err(&x, &prev_ref.get(n - 1).unwrap());
        assert!(e < 2e-2, "{name}: f16 relative error {e:e}");
    }
}

fn sd15() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    })
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

#[test]
fn kinds_round_trip_names_and_classes() {
    let names: Vec<&str> = SchedulerKind::all().iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "ddim",
            "pndm",
            "euler",
            "euler_ancestral",
            "dpmpp_2m",
            "dpmpp_2m_karras",
            "lms",
            "unipc"
        ]
    );
    for &k in SchedulerKind::all() {
        assert_eq!(SchedulerKind::from_name(k.name()), Some(k));
        let from_class = SchedulerKind::from_class_name(k.class_name()).unwrap();
        assert_eq!(from_class.class_name(), k.class_name());
    }
    assert_eq!(SchedulerKind::from_name("heun"), None);
    assert_eq!(SchedulerKind::from_class_name("DDPMScheduler"), None);
}

#[test]
fn default_kind_follows_class_name_and_karras_flag() {
    let cfg = SchedulerConfig::from_json(sd15()).unwrap();
    assert_eq!(cfg.default_kind().unwrap(), SchedulerKind::Pndm);
    let dpm = json!({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true});
    assert_eq!(
        SchedulerConfig::from_json(dpm)
            .unwrap()
            .default_kind()
            .unwrap(),
        SchedulerKind::DpmSolverMultistepKarras
    );
    let dpm = json!({"_class_name": "DPMSolverMultistepScheduler"});
    assert_eq!(
        SchedulerConfig::from_json(dpm)
            .unwrap()
            .default_kind()
            .unwrap(),
        SchedulerKind::DpmSolverMultistep
    );
}

#[test]
fn unsupported_class_is_named() {
    let cfg =
        SchedulerConfig::from_json(with(sd15(), "_class_name", json!("HeunDiscreteScheduler")))
            .unwrap();
    let err = cfg.default_kind().unwrap_err();
    assert!(
        matches!(err, SchedulerError::UnsupportedClass { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HeunDiscreteScheduler"), "{err}");
    // Other kinds still build from its values.
    assert!(cfg.build(SchedulerKind::Euler, 10, 0.0).is_ok());
    let err = SchedulerConfig::from_json(json!({"beta_start": 0.001}))
        .unwrap()
        .default_kind()
        .unwrap_err();
    assert!(err.to_string().contains("_class_name"), "{err}");
}

#[test]
fn thresholding_is_rejected_by_name() {
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::UniPc,
    ] {
        let cfg = SchedulerConfig::from_json(with(sd15(), "thresholding", json!(true))).unwrap();
        let err = cfg.build(kind, 10, 0.0).err().unwrap();
        assert!(matches!(err, SchedulerError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("`thresholding`"), "{err}");
    }
    // Classes without the parameter ignore the key, as diffusers does.
    let cfg = SchedulerConfig::from_json(with(sd15(), "thresholding", json!(true))).unwrap();
    assert!(cfg.build(SchedulerKind::Euler, 10, 0.0).is_ok());
}

#[test]
fn bad_step_counts_are_errors() {
    let cfg = SchedulerConfig::from_json(sd15()).unwrap();
    for &kind in SchedulerKind::all() {
        let err = cfg.build(kind, 0, 0.0).err().unwrap();
        assert!(
            matches!(err, SchedulerError::InvalidSteps { steps: 0, .. }),
            "{err}"
        );
        let err = cfg.build(kind, 1001, 0.0).err().unwrap();
        assert!(
            matches!(err, SchedulerError::InvalidSteps { steps: 1001, .. }),
            "{err}"
        );
    }
    let prk = SchedulerConfig::from_json(with(sd15(), "skip_prk_steps", json!(false))).unwrap();
    for n in 1..4 {
        let err = prk.build(SchedulerKind::Pndm, n, 0.0).err().unwrap();
        assert!(err.to_string().contains("at least 4"), "{err}");
    }
    assert_eq!(
        prk.build(SchedulerKind::Pndm, 4, 0.0)
            .unwrap()
            .timesteps()
            .len(),
        13
    );
    // Leading spacing with steps_offset 1 and 1000 steps indexes past the schedule.
    let err = cfg.build(SchedulerKind::Ddim, 1000, 0.0).err().unwrap();
    assert!(err.to_string().contains("timestep 1000"), "{err}");
}

#[test]
fn eta_is_checked() {
    let cfg = SchedulerConfig::from_json(sd15()).unwrap();
    for eta in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            cfg.build(SchedulerKind::Ddim, 10, eta).err().unwrap(),
            SchedulerError::InvalidEta(_)
        ));
    }
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("beta_schedule", json!("cosine")),
        ("steps_offset", json!("1")),
        ("prediction_type", json!("flow")),
        ("timestep_spacing", json!("even")),
        ("num_train_timesteps", json!(0)),
        ("trained_betas", json!([0.1, 0.2])),
        ("set_alpha_to_one", json!(1)),
    ];
    for (key, value) in cases {
        let cfg = SchedulerConfig::from_json(with(sd15(), key, value.clone())).unwrap();
        let err = cfg
            .build(SchedulerKind::Pndm, 10, 0.0)
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} accepted"));
        assert!(
            err.to_string().contains(&format!("`{key}`")),
            "{key}: {err}"
        );
    }
    let unipc = json!({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"});
    let err = SchedulerConfig::from_json(unipc)
        .unwrap()
        .build(SchedulerKind::UniPc, 10, 0.0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("final_sigmas_type"), "{err}");
    let dpm = json!({"_class_name": "DPMSolverMultistepScheduler", "use_beta_sigmas": true});
    let err = SchedulerConfig::from_json(dpm)
        .unwrap()
        .build(SchedulerKind::DpmSolverMultistep, 10, 0.0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("use_beta_sigmas"), "{err}");
}

#[test]
fn keys_of_other_classes_and_unknown_keys_are_ignored() {
    let v = with(
        with(sd15(), "solver_order", json!(0)),
        "some_future_key",
        json!({"x": 1}),
    );
    let cfg = SchedulerConfig::from_json(v).unwrap();
    assert!(cfg.build(SchedulerKind::Euler, 10, 0.0).is_ok());
    assert!(
        cfg.build(SchedulerKind::DpmSolverMultistep, 10, 0.0)
            .err()
            .unwrap()
            .to_string()
            .contains("solver_order")
    );
}

#[test]
fn pipeline_fixups_follow_diffusers() {
    // steps_offset present in the file: every scheduler built from it sees 1.
    let v = with(sd15(), "steps_offset", json!(0));
    let mut cfg = SchedulerConfig::from_json(v).unwrap();
    assert_eq!(
        cfg.build(SchedulerKind::Ddim, 10, 0.0).unwrap().timesteps()[0],
        900.0
    );
    cfg.apply_pipeline_fixups();
    assert_eq!(
        cfg.build(SchedulerKind::Ddim, 10, 0.0).unwrap().timesteps()[0],
        901.0
    );
    assert_eq!(
        cfg.build(SchedulerKind::Pndm, 10, 0.0).unwrap().timesteps()[0],
        901.0
    );
    // Absent: only the folder's own class is changed.
    let mut v = sd15();
    v.as_object_mut().unwrap().remove("steps_offset");
    let mut cfg = SchedulerConfig::from_json(v).unwrap();
    cfg.apply_pipeline_fixups();
    assert_eq!(
        cfg.build(SchedulerKind::Pndm, 10, 0.0).unwrap().timesteps()[0],
        901.0
    );
    assert_eq!(
        cfg.build(SchedulerKind::Ddim, 10, 0.0).unwrap().timesteps()[0],
        900.0
    );
}

#[test]
fn use_default_values_are_dropped_like_from_config() {
    let v = with(
        with(sd15(), "timestep_spacing", json!("trailing")),
        "_use_default_values",
        json!(["timestep_spacing"]),
    );
    let cfg = SchedulerConfig::from_json(v).unwrap();
    // Euler's own default (linspace) applies.
    assert_eq!(
        cfg.build(SchedulerKind::Euler, 10, 0.0)
            .unwrap()
            .timesteps()[0],
        999.0
    );
}

#[test]
fn steps_must_run_in_order() {
    let cfg = SchedulerConfig::from_json(sd15()).unwrap();
    let mut sched = cfg.build(SchedulerKind::Euler, 3, 0.0).unwrap();
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut noise = Replay {
        draws: Vec::new(),
        used: 0,
    };
    assert!(sched.step(&x, 1, &x, &mut noise).is_err());
    assert!(sched.step(&x, 0, &x, &mut noise).is_ok());
    assert!(sched.step(&x, 0, &x, &mut noise).is_err());
    let bad = Tensor::ones((1, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(sched.step(&bad, 1, &x, &mut noise).is_err());
    assert!(sched.scale_model_input(&x, 3).is_err());
}

#[test]
fn files_are_read_with_python_json_and_errors_name_the_path() {
    let dir = std::env::temp_dir().join(format!("sdserve-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}"#,
    )
    .unwrap();
    let cfg = SchedulerConfig::from_file(&good).unwrap();
    assert_eq!(cfg.class_name(), Some("DPMSolverMultistepScheduler"));
    assert_eq!(
        cfg.build(SchedulerKind::DpmSolverMultistep, 10, 0.0)
            .unwrap()
            .timesteps()[0],
        999.0
    );
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let err = SchedulerConfig::from_file(&bad).err().unwrap();
    assert!(err.to_string().contains("bad.json"), "{err}");
    let err = SchedulerConfig::from_file(&dir.join("missing.json"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
