//! `LMSDiscreteScheduler`: linear multistep in sigma space, order 4.

use candle_core::{Result, Tensor};

use super::config::Params;
use super::euler::{Prediction, SigmaSchedule, scale_input};
use super::noising::{NoiseLevel, at, start_at};
use super::numeric::{
    Rescale, SPACINGS, SigmaKind, TimestepCast, TrainSchedule, k_timesteps, log_sigmas,
    np_interp_unit, sigmas_to_timesteps,
};
use super::{Scheduler, SchedulerError, StepCount, lincomb, step_inputs};
use crate::noise::NoiseSource;

const CLASS: &str = "LMSDiscreteScheduler";
/// The `order` argument of `step`, which pipelines leave at its default.
const ORDER: usize = 4;

pub struct Lms {
    s: SigmaSchedule,
    prediction: Prediction,
    derivatives: Vec<Tensor>,
    next: usize,
}

impl Lms {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::NotAParameter)?;
        let prediction = match p.choice(
            "prediction_type",
            "epsilon",
            &["epsilon", "v_prediction", "sample"],
        )? {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            _ => Prediction::Sample,
        };
        let sigma_kind = SigmaKind::read(p)?;
        let spacing = p.choice("timestep_spacing", "linspace", &SPACINGS)?;
        let offset = p.int("steps_offset", 0)?;
        let n = steps.0;
        let mut timesteps = k_timesteps(spacing, schedule.num_train_timesteps, n, offset);
        let full = schedule.sigmas();
        let logs = log_sigmas(&full);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| np_interp_unit(t, &full))
            .collect();
        let (mut lo, mut hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
        if sigma_kind == SigmaKind::Exponential {
            // Not parameters of this class: diffusers reads them only if the file carries them,
            // and only for exponential sigmas.
            lo = p.opt_f64("sigma_min")?.unwrap_or(lo);
            hi = p.opt_f64("sigma_max")?.unwrap_or(hi);
        }
        if let Some(s) = sigma_kind.sigmas(lo, hi, n) {
            timesteps = sigmas_to_timesteps(&s, &logs, TimestepCast::Float32);
            sigmas = s;
        }
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        Ok(Self {
            s: SigmaSchedule::new(timesteps, sigmas, spacing),
            prediction,
            derivatives: Vec::new(),
            next: 0,
        })
    }

    /// Integral over `[sigma_i, sigma_{i+1}]` of the Lagrange basis polynomial of node
    /// `current` on the nodes `sigma_i, sigma_{i-1}, ...` (`order` of them). Three-point
    /// Gauss-Legendre is exact for these polynomials (degree <= 3).
    fn coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let s = |k: usize| self.s.sigmas[i - k] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(k)) / (s(current) - s(k)))
                .product::<f64>()
        };
        let (a, b) = (self.s.sigmas[i] as f64, self.s.sigmas[i + 1] as f64);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * x)
            + 8.0 / 9.0 * basis(mid)
            + 5.0 / 9.0 * basis(mid + half * x))
    }
}

impl Scheduler for Lms {
    fn timesteps(&self) -> &[f64] {
        &self.s.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.s.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        scale_input(sample, &self.s, step_index, CLASS)
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        start_at(CLASS, &mut self.next, begin, self.s.timesteps.len())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        NoiseLevel::Sigma(at(CLASS, &self.s.sigmas, index)?).apply(original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (x, mo) = step_inputs(
            CLASS,
            self.next,
            step_index,
            self.s.timesteps.len(),
            model_output,
            sample,
        )?;
        let i = step_index;
        let sigma = self.s.sigmas[i] as f64;
        let (ds, dm) = self.prediction.derivative_coeffs(sigma);
        self.derivatives.push(lincomb(&[(ds, &x), (dm, &mo)])?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let coeffs: Vec<f64> = (0..order).map(|j| self.coefficient(order, i, j)).collect();
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, &x)];
        terms.extend(
            coeffs
                .iter()
                .zip(self.derivatives.iter().rev())
                .map(|(&c, d)| (c, d)),
        );
        let prev = lincomb(&terms)?;
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}
