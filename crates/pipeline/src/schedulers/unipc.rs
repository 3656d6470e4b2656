//! `UniPCMultistepScheduler` (UniP predictor with UniC corrector, B(h) variants bh1 and bh2).

use candle_core::{Result, Tensor};

use super::config::Params;
use super::multistep::{Interval, Prediction, solver_order};
use super::noising::{NoiseLevel, at, start_at};
use super::numeric::{
    Rescale, SPACINGS, SigmaKind, TimestepCast, TrainSchedule, lambda, log_sigmas,
    multistep_timesteps, np_interp_unit, sigmas_to_timesteps, solve,
};
use super::{Scheduler, SchedulerError, StepCount, lincomb, step_inputs};
use crate::noise::NoiseSource;

const CLASS: &str = "UniPCMultistepScheduler";

pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    predict_x0: bool,
    bh2: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<i64>,
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    next: usize,
}

/// Refuses what this class does not implement; reads the sigma kind among them.
fn reject_unmodelled(p: &Params) -> std::result::Result<SigmaKind, SchedulerError> {
    p.reject_non_null(
        "solver_p",
        "an external predictor scheduler is not supported",
    )?;
    let sigma_kind = SigmaKind::read(p)?;
    p.reject_true(
        "use_flow_sigmas",
        "flow-matching sigmas are not implemented",
    )?;
    p.reject_true(
        "use_dynamic_shifting",
        "dynamic shifting (flow matching) is not implemented",
    )?;
    p.reject_non_null("shift_terminal", "it applies to flow-matching sigmas only")?;
    Ok(sigma_kind)
}

/// With a zero final sigma these settings make diffusers compute 0 * inf at the last step.
/// `lower_order_final_or_first_order`: `lower_order_final` holds, or the solver is first order.
fn check_zero_final(
    p: &Params,
    predict_x0: bool,
    bh2: bool,
    lower_order_final_or_first_order: bool,
) -> std::result::Result<(), SchedulerError> {
    let nan = |why: &str| {
        Err(p.err(
            "final_sigmas_type",
            format!("`zero` with {why} gives NaN in diffusers; use `sigma_min`"),
        ))
    };
    if !predict_x0 {
        return nan("predict_x0 false");
    }
    if !bh2 {
        return nan("solver_type bh1");
    }
    if !lower_order_final_or_first_order {
        return nan("lower_order_final false");
    }
    Ok(())
}

/// The timesteps (recomputed from the sigmas when a sigma kind sets them) and every sigma,
/// the final one included.
fn schedule_sigmas(
    schedule: &TrainSchedule,
    timesteps: Vec<f64>,
    n: usize,
    sigma_kind: SigmaKind,
    (sigma_min, sigma_max): (Option<f64>, Option<f64>),
    final_zero: bool,
) -> (Vec<f64>, Vec<f32>) {
    let t_train = schedule.num_train_timesteps;
    let full = schedule.sigmas();
    let logs = log_sigmas(&full);
    let (s_lo, s_hi) = (full[0] as f64, full[t_train - 1] as f64);
    let (smin, smax) = (sigma_min.unwrap_or(s_lo), sigma_max.unwrap_or(s_hi));
    let (timesteps, sigmas, last) = match sigma_kind.sigmas(smin, smax, n) {
        Some(s) => {
            let cast = match sigma_kind {
                SigmaKind::Karras => TimestepCast::Round,
                _ => TimestepCast::Truncate,
            };
            let last = if final_zero {
                0.0
            } else {
                s[s.len() - 1] as f32
            };
            (sigmas_to_timesteps(&s, &logs, cast), s, last)
        }
        None => {
            let s = timesteps
                .iter()
                .map(|&t| np_interp_unit(t, &full))
                .collect();
            (timesteps, s, if final_zero { 0.0 } else { full[0] })
        }
    };
    let sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
    (timesteps, sigmas)
}

impl UniPc {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::BetasAndClampLast)?;
        let solver_order = solver_order(p, 5)?;
        let prediction = Prediction::read(p)?;
        p.reject_true(
            "thresholding",
            "dynamic thresholding is not implemented (it does not suit latent diffusion)",
        )?;
        let predict_x0 = p.bool("predict_x0", true)?;
        if prediction == Prediction::Flow && !predict_x0 {
            return Err(p.err("prediction_type", "`flow_prediction` needs predict_x0"));
        }
        // diffusers maps the DPM-Solver names to bh2.
        let bh2 = p.choice(
            "solver_type",
            "bh2",
            &["bh1", "bh2", "midpoint", "heun", "logrho"],
        )? != "bh1";
        let lower_order_final = p.bool("lower_order_final", true)?;
        let disable_corrector = p.int_list("disable_corrector")?;
        let sigma_kind = reject_unmodelled(p)?;
        let spacing = p.choice("timestep_spacing", "linspace", &SPACINGS)?;
        let offset = p.int("steps_offset", 0)?;
        let final_zero = p.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "zero";
        if final_zero {
            check_zero_final(p, predict_x0, bh2, lower_order_final || solver_order <= 1)?;
        }
        let sigma_range = (p.opt_f64("sigma_min")?, p.opt_f64("sigma_max")?);
        let t_train = schedule.num_train_timesteps;
        let timesteps = multistep_timesteps(spacing, t_train, t_train, steps.0, offset);
        let (timesteps, sigmas) = schedule_sigmas(
            &schedule,
            timesteps,
            steps.0,
            sigma_kind,
            sigma_range,
            final_zero,
        );
        Ok(Self {
            timesteps,
            sigmas,
            prediction,
            predict_x0,
            bh2,
            solver_order,
            lower_order_final,
            disable_corrector,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            next: 0,
        })
    }

    /// Shared part of UniP and UniC between sigma index `s0` (current) and `t` (target):
    /// `(sample coefficient, m0 coefficient, -scale * B(h), rks, b)` with `x_t = cx * x + cm *
    /// m0 + bscale * (sum of rho_k * D1_k)`.
    fn bh_terms(
        &self,
        t: usize,
        s0: usize,
        order: usize,
        previous: impl Fn(usize) -> usize,
    ) -> BhTerms {
        let sig = |k: usize| self.sigmas[k] as f64;
        let Interval {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            lambda_s0,
            h,
        } = Interval::new(&self.sigmas, t, s0);
        let mut rks: Vec<f64> = (1..order)
            .map(|k| (lambda(sig(previous(k))) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|rk| rk.powi(i as i32 - 1))
                    .collect::<Vec<f64>>(),
            );
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let (cx, cm, bscale) = if self.predict_x0 {
            (sigma_t / sigma_s0, -(alpha_t * h_phi_1), -(alpha_t * b_h))
        } else {
            (alpha_t / alpha_s0, -(sigma_t * h_phi_1), -(sigma_t * b_h))
        };
        BhTerms {
            cx,
            cm,
            bscale,
            rks,
            r,
            b,
        }
    }

    /// UniP: predicts the sample at step `i + 1`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let bh = self.bh_terms(i + 1, i, order, |k| i - k);
        let outs = &self.model_outputs;
        let m0 = &outs[outs.len() - 1];
        let rhos: Vec<f64> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                let k = order - 1;
                solve(
                    bh.r[..k].iter().map(|row| row[..k].to_vec()).collect(),
                    bh.b[..k].to_vec(),
                )
            }
        };
        let diffs: Vec<Tensor> = (1..order)
            .map(|k| &outs[outs.len() - 1 - k] - m0)
            .collect::<Result<_>>()?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(bh.cx, x), (bh.cm, m0)];
        // D1_k = (m_k - m0) / r_k
        for (k, d) in diffs.iter().enumerate() {
            terms.push((bh.bscale * rhos[k] / bh.rks[k], d));
        }
        lincomb(&terms)
    }

    /// UniC: corrects the sample of step `i` with the model output `model_t` at it.
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let bh = self.bh_terms(i, i - 1, order, |k| i - (k + 1));
        let outs = &self.model_outputs;
        let m0 = &outs[outs.len() - 1];
        let rhos: Vec<f64> = if order == 1 {
            vec![0.5]
        } else {
            solve(bh.r.clone(), bh.b.clone())
        };
        let diffs: Vec<Tensor> = (1..order)
            .map(|k| &outs[outs.len() - 1 - k] - m0)
            .collect::<Result<_>>()?;
        let d1_t = (model_t - m0)?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(bh.cx, last_sample), (bh.cm, m0)];
        for (k, d) in diffs.iter().enumerate() {
            terms.push((bh.bscale * rhos[k] / bh.rks[k], d));
        }
        terms.push((bh.bscale * rhos[order - 1], &d1_t));
        lincomb(&terms)
    }
}

struct BhTerms {
    cx: f64,
    cm: f64,
    bscale: f64,
    rks: Vec<f64>,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl Scheduler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn start_at(&mut self, begin: usize) -> Result<()> {
        start_at(CLASS, &mut self.next, begin, self.timesteps.len())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        NoiseLevel::VariancePreserving(at(CLASS, &self.sigmas, index)?).apply(original, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let (mut x, mo) = step_inputs(CLASS, self.next, step_index, n, model_output, sample)?;
        let i = step_index;
        let m = self
            .prediction
            .convert(self.predict_x0, self.sigmas[i] as f64, &mo, &x)?;
        let use_corrector = i > 0
            && !self.disable_corrector.contains(&(i as i64 - 1))
            && self.last_sample.is_some();
        if use_corrector && let Some(last) = &self.last_sample {
            x = self.correct(&m, last, i, self.this_order)?;
        }
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(m);
        let order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&x, i, self.this_order)?;
        self.last_sample = Some(x);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}
