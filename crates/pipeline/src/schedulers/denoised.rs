//! The clean latents a model output implies at a timestep, for previews of a running
//! generation. Every scheduler's `scale_model_input` puts the UNet input in the training
//! parameterisation `x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`, so one formula serves them all.

use candle_core::{Result, Tensor};

use super::multistep::Prediction;

/// `alphas_cumprod` of the training schedule and what the model predicts.
pub struct DenoisedEstimate {
    pub(super) alphas_cumprod: Vec<f32>,
    pub(super) prediction: Prediction,
}

impl DenoisedEstimate {
    /// `ᾱ` at a (possibly fractional) train timestep, linearly interpolated.
    fn alpha_cumprod(&self, t: f64) -> f64 {
        let last = self.alphas_cumprod.len().saturating_sub(1);
        let t = if t.is_finite() {
            t.clamp(0.0, last as f64)
        } else {
            0.0
        };
        let (lo, frac) = (t.floor() as usize, t.fract());
        let hi = (lo + 1).min(last);
        let a = |i: usize| self.alphas_cumprod[i] as f64;
        a(lo) + (a(hi) - a(lo)) * frac
    }

    /// The predicted `x_0` from the model output for the UNet input `model_input` at train
    /// timestep `t` (same shapes, F32).
    pub fn x0(&self, model_output: &Tensor, model_input: &Tensor, t: f64) -> Result<Tensor> {
        let ab = self.alpha_cumprod(t).clamp(0.0, 1.0);
        let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
        match self.prediction {
            // Near ᾱ = 0 the division amplifies the error without bound; 1e-2 keeps the first
            // previews of zero-SNR schedules finite.
            Prediction::Epsilon => (model_input - (model_output * s)?)? / a.max(1e-2),
            Prediction::V => (model_input * a)? - (model_output * s)?,
            Prediction::Sample => Ok(model_output.clone()),
            Prediction::Flow => model_input - model_output,
        }
    }
}
