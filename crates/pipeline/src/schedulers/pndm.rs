//! `PNDMScheduler`: pseudo Runge-Kutta warm-up (unless `skip_prk_steps`) then linear multistep.

use candle_core::{Result, Tensor};

use super::config::Params;
use super::noising::{alpha_level, start_at};
use super::numeric::{Rescale, SPACINGS, TrainSchedule, pndm_base_timesteps};
use super::{Scheduler, SchedulerError, StepCount, lincomb, step_error, step_inputs};
use crate::noise::NoiseSource;

const CLASS: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

pub struct Pndm {
    schedule: TrainSchedule,
    num_inference_steps: usize,
    skip_prk_steps: bool,
    v_prediction: bool,
    final_alpha_cumprod: f32,
    prk_timesteps: Vec<i64>,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
    next: usize,
}

impl Pndm {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::NotAParameter)?;
        let skip_prk_steps = p.bool("skip_prk_steps", false)?;
        let v_prediction =
            p.choice("prediction_type", "epsilon", &["epsilon", "v_prediction"])? == "v_prediction";
        let set_alpha_to_one = p.bool("set_alpha_to_one", false)?;
        let spacing = p.choice("timestep_spacing", "leading", &SPACINGS)?;
        let offset = p.int("steps_offset", 0)?;
        let n = steps.0;
        let t_train = schedule.num_train_timesteps;
        let base = pndm_base_timesteps(spacing, t_train, n, offset);
        let m = base.len();
        let (prk_timesteps, plms_timesteps) = if skip_prk_steps {
            let mut plms: Vec<i64> = base[..m - 1].to_vec();
            if m >= 2 {
                plms.push(base[m - 2]);
            }
            plms.push(base[m - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if m < PNDM_ORDER {
                return Err(SchedulerError::InvalidSteps {
                    class: CLASS,
                    steps: n,
                    reason:
                        "the Runge-Kutta warm-up needs at least 4 steps (or set skip_prk_steps)"
                            .into(),
                });
            }
            let half = (t_train / n / 2) as i64;
            let last: Vec<i64> = base[m - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            // np: prk[:-1].repeat(2)[1:-1][::-1]
            let repeated: Vec<i64> = last[..last.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..m - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps_i: Vec<i64> = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .copied()
            .collect();
        let ratio = (t_train / n) as i64;
        let mut looked_up: Vec<i64> = timesteps_i.clone();
        if skip_prk_steps && timesteps_i.len() > 1 {
            looked_up.push(timesteps_i[1] + ratio);
        }
        schedule.check_timesteps(CLASS, n, spacing, offset, &looked_up)?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(set_alpha_to_one);
        Ok(Self {
            timesteps: timesteps_i.iter().map(|&t| t as f64).collect(),
            timesteps_i,
            prk_timesteps,
            num_inference_steps: n,
            skip_prk_steps,
            v_prediction,
            final_alpha_cumprod,
            schedule,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
            next: 0,
        })
    }

    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let (a_t, a_prev) = self
            .schedule
            .alphas_at(CLASS, t, prev_t, self.final_alpha_cumprod)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let mo_coeff = -(a_prev - a_t) / denom;
        if self.v_prediction {
            // eps = sqrt(a_t) * v + sqrt(b_t) * sample
            lincomb(&[
                (sample_coeff + mo_coeff * b_t.sqrt(), sample),
                (mo_coeff * a_t.sqrt(), model_output),
            ])
        } else {
            lincomb(&[(sample_coeff, sample), (mo_coeff, model_output)])
        }
    }

    fn step_prk(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        let half = (self.schedule.num_train_timesteps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let accumulate = |acc: Option<Tensor>, w: f64, m: &Tensor| -> Result<Tensor> {
            let term = m.affine(w, 0.0)?;
            match acc {
                None => Ok(term),
                Some(a) => a + term,
            }
        };
        let mut mo = model_output;
        match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(accumulate(self.cur_model_output.take(), 1.0 / 6.0, &mo)?);
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(accumulate(self.cur_model_output.take(), 1.0 / 3.0, &mo)?);
            }
            _ => {
                mo = accumulate(self.cur_model_output.take(), 1.0 / 6.0, &mo)?;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(&cur_sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(step_error(format!(
                "{CLASS}: linear multistep needs the Runge-Kutta warm-up first"
            )));
        }
        let ratio = (self.schedule.num_train_timesteps / self.num_inference_steps) as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample;
        let mo = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            lincomb(&[(0.5, &model_output), (0.5, &e[0])])?
        } else if k == 2 {
            lincomb(&[(1.5, &e[1]), (-0.5, &e[0])])?
        } else if k == 3 {
            lincomb(&[
                (23.0 / 12.0, &e[2]),
                (-16.0 / 12.0, &e[1]),
                (5.0 / 12.0, &e[0]),
            ])?
        } else {
            lincomb(&[
                (55.0 / 24.0, &e[3]),
                (-59.0 / 24.0, &e[2]),
                (37.0 / 24.0, &e[1]),
                (-9.0 / 24.0, &e[0]),
            ])?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for Pndm {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (s, mo) = step_inputs(
            CLASS,
            self.next,
            step_index,
            self.timesteps_i.len(),
            model_output,
            sample,
        )?;
        let timestep = self.timesteps_i[step_index];
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(mo, timestep, s)?
        } else {
            self.step_plms(mo, timestep, s)?
        };
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}
