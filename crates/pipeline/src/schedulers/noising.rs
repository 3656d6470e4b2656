//! How each class noises a clean sample to the level of one of its timesteps (diffusers'
//! `add_noise`), and starting a run part-way (`set_begin_index`): what image-to-image needs.
//! Coefficients are computed in float32 on the host, as torch computes them from the class's
//! float32 tables.

use candle_core::{Result, Tensor};

use super::{step_error, to_work};

/// The noise level of one timestep, in the parameterisation its class's `add_noise` uses.
#[derive(Debug, Clone, Copy)]
pub(super) enum NoiseLevel {
    /// `sqrt(ᾱ) · x + sqrt(1 − ᾱ) · ε` (DDIM, PNDM), from `alphas_cumprod[t]`.
    AlphaCumprod(f32),
    /// `x + σ · ε` (Euler, Euler ancestral, LMS).
    Sigma(f32),
    /// `α_t · x + σ_t · ε` with `α_t = 1 / sqrt(σ² + 1)`, `σ_t = σ · α_t` (DPM-Solver, UniPC).
    VariancePreserving(f32),
}

impl NoiseLevel {
    /// `original` noised with `noise` (same shape) to this level, in the work dtype.
    pub(super) fn apply(self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        if original.shape() != noise.shape() {
            return Err(step_error(format!(
                "add_noise: noise shape {:?} differs from sample shape {:?}",
                noise.shape(),
                original.shape()
            )));
        }
        let (x, e) = (to_work(original)?, to_work(noise)?);
        let (a, b) = match self {
            Self::AlphaCumprod(ac) => (ac.sqrt(), (1.0f32 - ac).sqrt()),
            Self::Sigma(s) => (1.0, s),
            Self::VariancePreserving(s) => {
                let alpha = 1.0f32 / (s * s + 1.0f32).sqrt();
                (alpha, s * alpha)
            }
        };
        let scaled = if a == 1.0 {
            x
        } else {
            x.affine(a as f64, 0.0)?
        };
        scaled + e.affine(b as f64, 0.0)?
    }
}

/// Moves a scheduler that has not stepped yet to start at timestep index `begin` of `total`.
pub(super) fn start_at(class: &str, next: &mut usize, begin: usize, total: usize) -> Result<()> {
    if *next != 0 {
        return Err(step_error(format!(
            "{class}: the start can only be moved before the first step"
        )));
    }
    if begin >= total {
        return Err(step_error(format!(
            "{class}: cannot start at step {begin} of {total} timesteps"
        )));
    }
    *next = begin;
    Ok(())
}

/// The entry `index` of a per-timestep table, or an error naming the class.
pub(super) fn at<T: Copy>(class: &str, table: &[T], index: usize) -> Result<T> {
    table
        .get(index)
        .copied()
        .ok_or_else(|| step_error(format!("{class}: no timestep at index {index}")))
}

/// The level of DDIM's and PNDM's timestep index `index`: `alphas_cumprod` at its integer
/// timestep.
pub(super) fn alpha_level(
    class: &str,
    timesteps: &[i64],
    alphas_cumprod: &[f32],
    index: usize,
) -> Result<NoiseLevel> {
    let t = at(class, timesteps, index)?;
    let t = usize::try_from(t).map_err(|_| step_error(format!("{class}: timestep {t}")))?;
    Ok(NoiseLevel::AlphaCumprod(at(class, alphas_cumprod, t)?))
}
