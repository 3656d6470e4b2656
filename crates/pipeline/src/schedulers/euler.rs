//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

use candle_core::{Result, Tensor};

use super::config::Params;
use super::noising::{NoiseLevel, at, start_at};
use super::numeric::{
    Rescale, SPACINGS, SigmaKind, TimestepCast, TrainSchedule, input_scale_f32, k_timesteps,
    log_sigmas, np_interp_unit, sigmas_to_timesteps, torch_linspace_f32,
};
use super::{Scheduler, SchedulerError, StepCount, draw_noise, lincomb, step_inputs, to_work};
use crate::noise::NoiseSource;

/// `x0 = a * sample + b * model_output` at noise level `sigma`.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    pub(super) fn x0_coeffs(self, sigma: f64) -> (f64, f64) {
        match self {
            Self::Epsilon => (1.0, -sigma),
            Self::V => (
                1.0 / (sigma * sigma + 1.0),
                -sigma / (sigma * sigma + 1.0).sqrt(),
            ),
            Self::Sample => (0.0, 1.0),
        }
    }

    /// `(sample - x0) / sigma = c_s * sample + c_m * model_output`.
    pub(super) fn derivative_coeffs(self, sigma: f64) -> (f64, f64) {
        match self {
            // Exact, where the general form would cancel.
            Self::Epsilon => (0.0, 1.0),
            _ => {
                let (a, b) = self.x0_coeffs(sigma);
                ((1.0 - a) / sigma, -b / sigma)
            }
        }
    }
}

/// Sigmas and timesteps shared by the sigma-space ("k-diffusion") schedulers.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than the timesteps (the final sigma).
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// The schedule with its `init_noise_sigma`, which depends on the timestep spacing.
    pub(super) fn new(timesteps: Vec<f64>, sigmas: Vec<f32>, spacing: &str) -> Self {
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = if spacing == "leading" {
            input_scale_f32(max) as f64
        } else {
            max as f64
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }
}

/// Model input scaling `sample / (sigma^2 + 1) ** 0.5`.
pub(super) fn scale_input(
    sample: &Tensor,
    s: &SigmaSchedule,
    step_index: usize,
    class: &str,
) -> Result<Tensor> {
    let Some(&sigma) = s
        .sigmas
        .get(step_index)
        .filter(|_| step_index < s.timesteps.len())
    else {
        return Err(super::step_error(format!(
            "{class}: step index {step_index} is past the last step"
        )));
    };
    let scaled = to_work(sample)?.affine(1.0 / input_scale_f32(sigma) as f64, 0.0)?;
    scaled.to_dtype(sample.dtype())
}

/// What the `euler` kinds read besides the train schedule.
struct Spacing {
    spacing: &'static str,
    offset: i64,
}

impl Spacing {
    fn read(p: &Params) -> std::result::Result<Self, SchedulerError> {
        Ok(Self {
            spacing: p.choice("timestep_spacing", "linspace", &SPACINGS)?,
            offset: p.int("steps_offset", 0)?,
        })
    }
}

const EULER: &str = "EulerDiscreteScheduler";

pub struct Euler {
    s: SigmaSchedule,
    prediction: Prediction,
    next: usize,
}

impl Euler {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::BetasAndClampLast)?;
        let pred_name = p.choice(
            "prediction_type",
            "epsilon",
            &["epsilon", "v_prediction", "sample", "original_sample"],
        )?;
        let prediction = match pred_name {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            _ => Prediction::Sample,
        };
        let interpolation = p.choice("interpolation_type", "linear", &["linear", "log_linear"])?;
        let sigma_kind = SigmaKind::read(p)?;
        let sigma_min_cfg = p.opt_f64("sigma_min")?;
        let sigma_max_cfg = p.opt_f64("sigma_max")?;
        let sp = Spacing::read(p)?;
        let continuous =
            p.choice("timestep_type", "discrete", &["discrete", "continuous"])? == "continuous";
        let final_sigma_min =
            p.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        let n = steps.0;

        let mut timesteps = k_timesteps(sp.spacing, schedule.num_train_timesteps, n, sp.offset);
        let full = schedule.sigmas();
        let logs = log_sigmas(&full);
        let mut sigmas: Vec<f64> = if interpolation == "linear" {
            timesteps
                .iter()
                .map(|&t| np_interp_unit(t, &full))
                .collect()
        } else {
            // From the largest train sigma down to the smallest, n + 1 values (diffusers keeps
            // all of them, so there is one sigma more than usual).
            let hi = logs[logs.len() - 1] as f64;
            let lo = logs[0] as f64;
            torch_linspace_f32(hi, lo, n + 1)
                .iter()
                .map(|&x| (x as f64).exp() as f32 as f64)
                .collect()
        };
        let smin = sigma_min_cfg.unwrap_or(sigmas[sigmas.len() - 1]);
        let smax = sigma_max_cfg.unwrap_or(sigmas[0]);
        if let Some(s) = sigma_kind.sigmas(smin, smax, n) {
            timesteps = sigmas_to_timesteps(&s, &logs, TimestepCast::Float32);
            sigmas = s;
        }
        let last = if final_sigma_min { full[0] } else { 0.0 };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        if continuous && prediction == Prediction::V {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| ((s as f64).ln() as f32) * 0.25)
                .map(f64::from)
                .collect();
        }
        Ok(Self {
            s: SigmaSchedule::new(timesteps, sigmas, sp.spacing),
            prediction,
            next: 0,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        scale_input(sample, &self.s, step_index, EULER)
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        start_at(EULER, &mut self.next, begin, self.s.timesteps.len())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        NoiseLevel::Sigma(at(EULER, &self.s.sigmas, index)?).apply(original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (x, mo) = step_inputs(
            EULER,
            self.next,
            step_index,
            self.s.timesteps.len(),
            model_output,
            sample,
        )?;
        // The pipeline's default `s_churn = 0` makes gamma 0: no noise, sigma_hat = sigma.
        let sigma = self.s.sigmas[step_index] as f64;
        let dt = self.s.sigmas[step_index + 1] as f64 - sigma;
        let (ds, dm) = self.prediction.derivative_coeffs(sigma);
        let prev = lincomb(&[(1.0 + dt * ds, &x), (dt * dm, &mo)])?;
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}

const EULER_A: &str = "EulerAncestralDiscreteScheduler";

pub struct EulerAncestral {
    s: SigmaSchedule,
    prediction: Prediction,
    next: usize,
}

impl EulerAncestral {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::BetasAndClampLast)?;
        let prediction = match p.string("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "sample" => {
                return Err(p.unsupported(
                    "prediction_type",
                    "diffusers does not implement it for this scheduler",
                ));
            }
            other => {
                return Err(p.err(
                    "prediction_type",
                    format!("`{other}` is not one of `epsilon`, `v_prediction`"),
                ));
            }
        };
        let sp = Spacing::read(p)?;
        let n = steps.0;
        let timesteps = k_timesteps(sp.spacing, schedule.num_train_timesteps, n, sp.offset);
        let full = schedule.sigmas();
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp_unit(t, &full) as f32)
            .chain([0.0])
            .collect();
        Ok(Self {
            s: SigmaSchedule::new(timesteps, sigmas, sp.spacing),
            prediction,
            next: 0,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        scale_input(sample, &self.s, step_index, EULER_A)
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        start_at(EULER_A, &mut self.next, begin, self.s.timesteps.len())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        NoiseLevel::Sigma(at(EULER_A, &self.s.sigmas, index)?).apply(original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (x, mo) = step_inputs(
            EULER_A,
            self.next,
            step_index,
            self.s.timesteps.len(),
            model_output,
            sample,
        )?;
        let from = self.s.sigmas[step_index] as f64;
        let to = self.s.sigmas[step_index + 1] as f64;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let dt = down - from;
        let (ds, dm) = self.prediction.derivative_coeffs(from);
        let z = draw_noise(noise, &mo)?;
        let prev = lincomb(&[(1.0 + dt * ds, &x), (dt * dm, &mo), (up, &z)])?;
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}
