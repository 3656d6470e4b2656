//! `DDIMScheduler`.

use candle_core::{Result, Tensor};

use super::config::Params;
use super::noising::{alpha_level, start_at};
use super::numeric::{Rescale, SPACINGS, TrainSchedule, ddim_timesteps};
use super::{Scheduler, SchedulerError, StepCount, draw_noise, lincomb, step_inputs};
use crate::noise::NoiseSource;

const CLASS: &str = "DDIMScheduler";

#[derive(Clone, Copy, PartialEq)]
enum Prediction {
    Epsilon,
    Sample,
    V,
}

pub struct Ddim {
    schedule: TrainSchedule,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<f64>,
    eta: f64,
    next: usize,
}

impl Ddim {
    pub(super) fn new(
        p: &Params,
        steps: StepCount,
        eta: f64,
    ) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::Betas)?;
        p.reject_true(
            "thresholding",
            "dynamic thresholding is not implemented (it does not suit latent diffusion)",
        )?;
        let prediction = match p.choice(
            "prediction_type",
            "epsilon",
            &["epsilon", "sample", "v_prediction"],
        )? {
            "epsilon" => Prediction::Epsilon,
            "sample" => Prediction::Sample,
            _ => Prediction::V,
        };
        let clip = if p.bool("clip_sample", true)? {
            Some(p.f64("clip_sample_range", 1.0)?)
        } else {
            None
        };
        let set_alpha_to_one = p.bool("set_alpha_to_one", true)?;
        let offset = p.int("steps_offset", 0)?;
        let spacing = p.choice("timestep_spacing", "leading", &SPACINGS)?;
        let n = steps.0;
        let timesteps_i = ddim_timesteps(spacing, schedule.num_train_timesteps, n, offset);
        schedule.check_timesteps(CLASS, n, spacing, offset, &timesteps_i)?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(set_alpha_to_one);
        Ok(Self {
            timesteps: timesteps_i.iter().map(|&t| t as f64).collect(),
            timesteps_i,
            num_inference_steps: n,
            final_alpha_cumprod,
            prediction,
            clip,
            eta,
            schedule,
            next: 0,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        start_at(CLASS, &mut self.next, begin, self.timesteps_i.len())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        alpha_level(
            CLASS,
            &self.timesteps_i,
            &self.schedule.alphas_cumprod,
            index,
        )?
        .apply(original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sample_w, mo) = step_inputs(
            CLASS,
            self.next,
            step_index,
            self.timesteps_i.len(),
            model_output,
            sample,
        )?;
        let t = self.timesteps_i[step_index];
        let prev_t = t - (self.schedule.num_train_timesteps / self.num_inference_steps) as i64;
        let (a_t, a_prev) = self
            .schedule
            .alphas_at(CLASS, t, prev_t, self.final_alpha_cumprod)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        // x0 = x0_s * sample + x0_m * model_output, eps likewise.
        let (x0_s, x0_m, eps_s, eps_m) = match self.prediction {
            Prediction::Epsilon => (1.0 / sa, -sb / sa, 0.0, 1.0),
            Prediction::Sample => (0.0, 1.0, 1.0 / sb, -sa / sb),
            Prediction::V => (sa, -sb, sb, sa),
        };
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir = (1.0 - a_prev - std_dev * std_dev).max(0.0).sqrt();
        let mut prev = match self.clip {
            None => lincomb(&[
                (a_prev.sqrt() * x0_s + dir * eps_s, &sample_w),
                (a_prev.sqrt() * x0_m + dir * eps_m, &mo),
            ])?,
            Some(r) => {
                let x0 = lincomb(&[(x0_s, &sample_w), (x0_m, &mo)])?.clamp(-r, r)?;
                let eps = lincomb(&[(eps_s, &sample_w), (eps_m, &mo)])?;
                lincomb(&[(a_prev.sqrt(), &x0), (dir, &eps)])?
            }
        };
        if self.eta > 0.0 {
            let z = draw_noise(noise, &mo)?;
            prev = (prev + z.affine(std_dev, 0.0)?)?;
        }
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}
