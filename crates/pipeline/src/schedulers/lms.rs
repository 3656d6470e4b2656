//! `LMSDiscreteScheduler`: linear multistep in sigma space, order 4.

use candle_core::{Result, Tensor};

use super::config::Params;
use super::euler::{Prediction, SigmaSchedule, scale_input};
use super::numeric::{
    Rescale, SPACINGS, TrainSchedule, exponential_sigmas, k_timesteps, karras_sigmas, log_sigmas,
    np_interp_unit, sigma_to_t,
};
use super::{Scheduler, SchedulerError, StepCount, check_shapes, expect_step, lincomb, to_work};
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
        let karras = p.opt_bool("use_karras_sigmas", false)?;
        let exponential = p.opt_bool("use_exponential_sigmas", false)?;
        p.reject_true(
            "use_beta_sigmas",
            "beta-distributed sigmas are not implemented",
        )?;
        if karras && exponential {
            return Err(p.err(
                "use_karras_sigmas",
                "only one of use_karras_sigmas and use_exponential_sigmas can be set",
            ));
        }
        let spacing = p.choice("timestep_spacing", "linspace", &SPACINGS)?;
        let offset = p.int("steps_offset", 0)?;
        let n = steps.0;
        let mut timesteps: Vec<f64> = k_timesteps(spacing, schedule.num_train_timesteps, n, offset)
            .iter()
            .map(|&t| t as f64)
            .collect();
        let full = schedule.sigmas();
        let logs = log_sigmas(&full);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| np_interp_unit(t, &full))
            .collect();
        if karras || exponential {
            let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = if karras {
                karras_sigmas(lo, hi, n)
            } else {
                // Not parameters of this class: diffusers reads them only if the file carries them.
                exponential_sigmas(
                    p.opt_f64("sigma_min")?.unwrap_or(lo),
                    p.opt_f64("sigma_max")?.unwrap_or(hi),
                    n,
                )
            };
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32 as f64)
                .collect();
        }
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        let init_noise_sigma = SigmaSchedule::init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            s: SigmaSchedule {
                timesteps,
                sigmas,
                init_noise_sigma,
            },
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

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        expect_step(CLASS, self.next, step_index, self.s.timesteps.len())?;
        check_shapes(CLASS, model_output, sample)?;
        let i = step_index;
        let sigma = self.s.sigmas[i] as f64;
        let x = to_work(sample)?;
        let mo = to_work(model_output)?;
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
