//! `DPMSolverMultistepScheduler` (DPM-Solver++ and DPM-Solver, orders 1-3, ODE and SDE).

use candle_core::{Result, Tensor};

use super::config::Params;
use super::multistep::{Interval, Prediction, solver_order};
use super::noising::{NoiseLevel, at, start_at};
use super::numeric::{
    Rescale, SPACINGS, SigmaKind, TimestepCast, TrainSchedule, lambda, log_sigmas,
    multistep_timesteps, np_interp_unit, np_linspace, sigmas_to_timesteps,
};
use super::{Scheduler, SchedulerError, StepCount, draw_noise, lincomb, step_inputs};
use crate::noise::NoiseSource;

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Clone, Copy, PartialEq)]
enum Algorithm {
    DpmSolverPP,
    DpmSolver,
    SdeDpmSolverPP,
    SdeDpmSolver,
}

impl Algorithm {
    fn is_sde(self) -> bool {
        matches!(self, Self::SdeDpmSolverPP | Self::SdeDpmSolver)
    }

    /// Data (x0) prediction rather than noise prediction.
    fn predicts_data(self) -> bool {
        matches!(self, Self::DpmSolverPP | Self::SdeDpmSolverPP)
    }
}

pub struct Dpm {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    algorithm: Algorithm,
    prediction: Prediction,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    next: usize,
}

impl Algorithm {
    fn read(p: &Params) -> std::result::Result<Self, SchedulerError> {
        Ok(
            match p.choice(
                "algorithm_type",
                "dpmsolver++",
                &[
                    "dpmsolver++",
                    "dpmsolver",
                    "sde-dpmsolver++",
                    "sde-dpmsolver",
                    "deis",
                ],
            )? {
                "dpmsolver" => Algorithm::DpmSolver,
                "sde-dpmsolver++" => Algorithm::SdeDpmSolverPP,
                "sde-dpmsolver" => Algorithm::SdeDpmSolver,
                // diffusers maps `deis` to `dpmsolver++`.
                _ => Algorithm::DpmSolverPP,
            },
        )
    }
}

impl Dpm {
    pub(super) fn new(p: &Params, steps: StepCount) -> std::result::Result<Self, SchedulerError> {
        let schedule = TrainSchedule::from_params(p, Rescale::BetasAndClampLast)?;
        let solver_order = solver_order(p, 10)?;
        let prediction = Prediction::read(p)?;
        p.reject_true(
            "thresholding",
            "dynamic thresholding is not implemented (it does not suit latent diffusion)",
        )?;
        let algorithm = Algorithm::read(p)?;
        let heun = p.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )? == "heun";
        let lower_order_final = p.bool("lower_order_final", true)?;
        let euler_at_final = p.bool("euler_at_final", false)?;
        let sigma_kind = SigmaKind::read(p)?;
        let lu = p.opt_bool("use_lu_lambdas", false)?;
        reject_unmodelled(p)?;
        let final_zero = p.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "zero";
        check_combination(p, algorithm, solver_order, prediction, final_zero)?;
        let (timesteps, sigmas) = schedule_sigmas(p, &schedule, steps.0, sigma_kind, lu)?;
        let last = if final_zero {
            0.0
        } else {
            schedule.sigmas()[0]
        };
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        Ok(Self {
            timesteps,
            sigmas,
            algorithm,
            prediction,
            solver_order,
            heun,
            lower_order_final,
            euler_at_final,
            final_zero,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            next: 0,
        })
    }
}

fn reject_unmodelled(p: &Params) -> std::result::Result<(), SchedulerError> {
    p.reject_true(
        "use_flow_sigmas",
        "flow-matching sigmas are not implemented",
    )?;
    p.reject_true(
        "use_dynamic_shifting",
        "dynamic shifting (flow matching) is not implemented",
    )?;
    p.reject_non_null(
        "variance_type",
        "learned variance outputs are not supported",
    )
}

/// Settings diffusers accepts one by one but cannot run together.
fn check_combination(
    p: &Params,
    algorithm: Algorithm,
    solver_order: usize,
    prediction: Prediction,
    final_zero: bool,
) -> std::result::Result<(), SchedulerError> {
    if !algorithm.predicts_data() && final_zero {
        return Err(p.err(
            "final_sigmas_type",
            "`zero` needs algorithm_type dpmsolver++ or sde-dpmsolver++; use `sigma_min`",
        ));
    }
    if algorithm == Algorithm::SdeDpmSolver && solver_order == 3 {
        return Err(p.unsupported(
            "solver_order",
            "diffusers has no third-order sde-dpmsolver update",
        ));
    }
    if prediction == Prediction::Flow && !algorithm.predicts_data() {
        return Err(p.err(
            "prediction_type",
            "`flow_prediction` needs algorithm_type dpmsolver++ or sde-dpmsolver++",
        ));
    }
    Ok(())
}

/// The `n` timesteps and their sigmas (without the final one), as `set_timesteps` makes them.
fn schedule_sigmas(
    p: &Params,
    schedule: &TrainSchedule,
    n: usize,
    sigma_kind: SigmaKind,
    lu: bool,
) -> std::result::Result<(Vec<f64>, Vec<f64>), SchedulerError> {
    let t_train = schedule.num_train_timesteps;
    let lambda_min_clipped = p.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
    let spacing = p.choice("timestep_spacing", "linspace", &SPACINGS)?;
    let offset = p.int("steps_offset", 0)?;
    // torch.searchsorted(flip(lambda_t), lambda_min_clipped): how many lambdas lie below it.
    let clip = lambda_min_clipped as f32;
    let clipped_idx = schedule
        .alphas_cumprod
        .iter()
        .filter(|&&a| {
            let l = ((a.sqrt() as f64).ln() as f32) - (((1.0 - a).sqrt() as f64).ln() as f32);
            l < clip
        })
        .count();
    let last_timestep = t_train - clipped_idx;
    let timesteps = multistep_timesteps(spacing, t_train, last_timestep, n, offset);
    let full = schedule.sigmas();
    let logs = log_sigmas(&full);
    let (s_lo, s_hi) = (full[0] as f64, full[t_train - 1] as f64);
    // Not parameters of this class: diffusers reads them only if the file carries them.
    let cfg_min = p.opt_f64("sigma_min")?;
    let cfg_max = p.opt_f64("sigma_max")?;
    // Karras and Lu timesteps are rounded, except for this beta schedule.
    let rounded = if schedule.beta_schedule == "squaredcos_cap_v2" {
        TimestepCast::Truncate
    } else {
        TimestepCast::Round
    };
    // Karras sigmas win over Lu's lambdas, which win over exponential sigmas.
    if lu && sigma_kind != SigmaKind::Karras {
        let (l_min, l_max) = (logs[0] as f64, logs[t_train - 1] as f64);
        let s: Vec<f64> = np_linspace(0.0, 1.0, n)
            .iter()
            .map(|r| (l_max + r * (l_min - l_max)).exp())
            .collect();
        return Ok((sigmas_to_timesteps(&s, &logs, rounded), s));
    }
    if let Some(s) = sigma_kind.sigmas(cfg_min.unwrap_or(s_lo), cfg_max.unwrap_or(s_hi), n) {
        let cast = match sigma_kind {
            SigmaKind::Karras => rounded,
            _ => TimestepCast::Truncate,
        };
        return Ok((sigmas_to_timesteps(&s, &logs, cast), s));
    }
    let s = timesteps
        .iter()
        .map(|&t| np_interp_unit(t, &full))
        .collect();
    Ok((timesteps, s))
}

impl Scheduler for Dpm {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let (x, mo) = step_inputs(CLASS, self.next, step_index, n, model_output, sample)?;
        let i = step_index;
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let lower_order_second = n >= 2 && i == n - 2 && self.lower_order_final && n < 15;
        let m = self.prediction.convert(
            self.algorithm.predicts_data(),
            self.sigmas[i] as f64,
            &mo,
            &x,
        )?;
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(m);
        let z = if self.algorithm.is_sde() {
            Some(draw_noise(noise, &mo)?)
        } else {
            None
        };
        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let prev = self.update(order, i, &x, z.as_ref())?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.next += 1;
        prev.to_dtype(sample.dtype())
    }
}

/// `x_t = x * sample + d0 * D0 + d1 * D1 + d2 * D2 + z * noise`.
struct Coeffs {
    x: f64,
    d0: f64,
    d1: f64,
    d2: f64,
    z: f64,
}

impl Dpm {
    fn coeffs(&self, order: usize, step: &Interval) -> Coeffs {
        let &Interval {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h,
            ..
        } = step;
        let em1 = (-h).exp_m1(); // exp(-h) - 1
        let ep1 = h.exp_m1(); // exp(h) - 1
        let one_minus_em2 = -(-2.0 * h).exp_m1(); // 1 - exp(-2h)
        let heun = self.heun && order == 2;
        let mut c = Coeffs {
            x: 0.0,
            d0: 0.0,
            d1: 0.0,
            d2: 0.0,
            z: 0.0,
        };
        match self.algorithm {
            Algorithm::DpmSolverPP => {
                c.x = sigma_t / sigma_s0;
                c.d0 = -(alpha_t * em1);
                c.d1 = if heun || order == 3 {
                    alpha_t * (em1 / h + 1.0)
                } else {
                    -0.5 * (alpha_t * em1)
                };
                c.d2 = -(alpha_t * ((em1 + h) / (h * h) - 0.5));
            }
            Algorithm::DpmSolver => {
                c.x = alpha_t / alpha_s0;
                c.d0 = -(sigma_t * ep1);
                c.d1 = if heun || order == 3 {
                    -(sigma_t * (ep1 / h - 1.0))
                } else {
                    -0.5 * (sigma_t * ep1)
                };
                c.d2 = -(sigma_t * ((ep1 - h) / (h * h) - 0.5));
            }
            Algorithm::SdeDpmSolverPP => {
                c.x = sigma_t / sigma_s0 * (-h).exp();
                c.d0 = alpha_t * one_minus_em2;
                c.d1 = if heun || order == 3 {
                    alpha_t * (one_minus_em2 / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * one_minus_em2)
                };
                c.d2 = alpha_t * ((one_minus_em2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5);
                c.z = sigma_t * one_minus_em2.sqrt();
            }
            Algorithm::SdeDpmSolver => {
                c.x = alpha_t / alpha_s0;
                c.d0 = -2.0 * (sigma_t * ep1);
                c.d1 = if heun {
                    -2.0 * (sigma_t * (ep1 / h - 1.0))
                } else {
                    -(sigma_t * ep1)
                };
                c.z = sigma_t * (2.0 * h).exp_m1().sqrt();
            }
        }
        c
    }

    fn update(&self, order: usize, i: usize, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let sig = |k: usize| self.sigmas[k] as f64;
        let step = Interval::new(&self.sigmas, i + 1, i);
        let (lambda_s0, h) = (step.lambda_s0, step.h);
        let c = self.coeffs(order, &step);
        let outs = &self.model_outputs;
        let m0 = &outs[outs.len() - 1];
        let mut terms: Vec<(f64, &Tensor)> = vec![(c.x, x), (c.d0, m0)];
        let mut diffs = Vec::new();
        let mut diff_coeffs = Vec::new();
        if order == 2 {
            let m1 = &outs[outs.len() - 2];
            let r0 = (lambda_s0 - lambda(sig(i - 1))) / h;
            // D1 = (m0 - m1) / r0
            diffs.push((m0 - m1)?);
            diff_coeffs.push(c.d1 / r0);
        } else if order == 3 {
            let m1 = &outs[outs.len() - 2];
            let m2 = &outs[outs.len() - 3];
            let lambda_s1 = lambda(sig(i - 1));
            let r0 = (lambda_s0 - lambda_s1) / h;
            let r1 = (lambda_s1 - lambda(sig(i - 2))) / h;
            // D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
            // D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
            let k0 = c.d1 * (1.0 + r0 / (r0 + r1)) + c.d2 / (r0 + r1);
            let k1 = -c.d1 * r0 / (r0 + r1) - c.d2 / (r0 + r1);
            diffs.push((m0 - m1)?);
            diffs.push((m1 - m2)?);
            diff_coeffs.push(k0 / r0);
            diff_coeffs.push(k1 / r1);
        }
        terms.extend(diff_coeffs.iter().copied().zip(diffs.iter()));
        if let Some(z) = z {
            terms.push((c.z, z));
        }
        lincomb(&terms)
    }
}
