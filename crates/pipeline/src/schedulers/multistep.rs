//! What `DPMSolverMultistepScheduler` and `UniPCMultistepScheduler` share: diffusers copies
//! these parts of the one class into the other.

use candle_core::{Result, Tensor};

use super::SchedulerError;
use super::config::Params;
use super::lincomb;
use super::numeric::{alpha_sigma, lambda};

/// `solver_order`, between 1 and `max`.
pub(super) fn solver_order(p: &Params, max: i64) -> std::result::Result<usize, SchedulerError> {
    let order = p.int("solver_order", 2)?;
    if !(1..=max).contains(&order) {
        return Err(p.err(
            "solver_order",
            format!("{order} is not between 1 and {max}"),
        ));
    }
    Ok(order as usize)
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Prediction {
    Epsilon,
    Sample,
    V,
    Flow,
}

impl Prediction {
    pub(super) fn read(p: &Params) -> std::result::Result<Self, SchedulerError> {
        Ok(
            match p.choice(
                "prediction_type",
                "epsilon",
                &["epsilon", "sample", "v_prediction", "flow_prediction"],
            )? {
                "epsilon" => Self::Epsilon,
                "sample" => Self::Sample,
                "v_prediction" => Self::V,
                _ => Self::Flow,
            },
        )
    }

    /// diffusers' `convert_model_output`: the model output at noise level `sigma` as a data (x0)
    /// prediction when `to_data`, else as a noise prediction.
    pub(super) fn convert(
        self,
        to_data: bool,
        sigma: f64,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (a, s) = alpha_sigma(sigma);
        if to_data {
            match self {
                Self::Epsilon => lincomb(&[(1.0 / a, sample), (-s / a, model_output)]),
                Self::Sample => Ok(model_output.clone()),
                Self::V => lincomb(&[(a, sample), (-s, model_output)]),
                Self::Flow => lincomb(&[(1.0, sample), (-sigma, model_output)]),
            }
        } else {
            match self {
                Self::Epsilon | Self::Flow => Ok(model_output.clone()),
                Self::Sample => lincomb(&[(1.0 / s, sample), (-a / s, model_output)]),
                Self::V => lincomb(&[(s, sample), (a, model_output)]),
            }
        }
    }
}

/// One solver step from sigma index `s0` to sigma index `t`: `alpha` and `sigma` at both ends,
/// `lambda` at `s0` and the step `h` in lambda.
pub(super) struct Interval {
    pub alpha_t: f64,
    pub sigma_t: f64,
    pub alpha_s0: f64,
    pub sigma_s0: f64,
    pub lambda_s0: f64,
    pub h: f64,
}

impl Interval {
    pub(super) fn new(sigmas: &[f32], t: usize, s0: usize) -> Self {
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[t] as f64);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[s0] as f64);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = lambda(sigmas[s0] as f64);
        Self {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            lambda_s0,
            h: lambda_t - lambda_s0,
        }
    }
}
