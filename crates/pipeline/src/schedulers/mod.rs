//! Denoising schedulers, numerically equal to the diffusers 0.42.1 classes of the same name.
//!
//! A [`SchedulerConfig`] is a folder's `scheduler/scheduler_config.json`. [`SchedulerConfig::build`]
//! makes any [`SchedulerKind`] from it with diffusers' `Class.from_config(config)` semantics:
//! keys of the file that are parameters of the target class apply, every other parameter takes
//! the class default, and the rest of the file is ignored. A value a class cannot honour is an
//! error naming the key.
//!
//! Schedule values (betas, `alphas_cumprod`, sigmas, timesteps) are rebuilt on the host with the
//! same float32/numpy arithmetic diffusers uses; per-step coefficients are f64 scalars applied
//! with a few tensor ops, in float32 (float64 for float64 samples) whatever the sample's dtype.
//!
//! Where this knowingly differs from diffusers:
//! - Euler/LMS timesteps recovered from Karras or exponential sigmas go through float32 `sqrt`
//!   and `log`, which torch (MKL) and numpy (SIMD) do not round correctly; ours are correctly
//!   rounded, so those fractional timesteps agree to ~1e-6 relative instead of bit for bit.
//! - A schedule whose first timestep repeats makes diffusers start at the repeat's second
//!   occurrence (and fail at the end); steps here always run from index 0, which is what
//!   diffusers does after `set_begin_index(0)`.
//! - Configurations for which diffusers produces NaN (UniPC with a zero final sigma and bh1,
//!   noise prediction, or no lower-order final step) are rejected, as are features not
//!   implemented: dynamic thresholding, beta sigmas, flow-matching sigmas, dynamic shifting,
//!   learned variance, an external UniPC predictor.
//! - Euler's `s_churn` noise is not offered (pipelines leave it at 0).

mod config;
mod ddim;
mod denoised;
mod dpm;
mod euler;
mod lms;
mod multistep;
mod noising;
mod numeric;
mod pndm;
mod unipc;

use std::path::{Path, PathBuf};

use candle_core::{DType, Result, Tensor};
use serde_json::{Map, Value};

use crate::noise::NoiseSource;

pub use config::parse_python_json;
pub use denoised::DenoisedEstimate;

/// One denoising run: built for a number of steps, stepped once per timestep, in order.
pub trait Scheduler: Send {
    /// The timestep passed to the UNet at each step (its length is the number of UNet calls,
    /// which differs from the requested steps for PNDM).
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial Gaussian latents (1 unless the class works in sigma space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input for step `step_index` (the sample itself unless the class works in
    /// sigma space).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Makes the run start at timestep index `begin` (diffusers' `set_begin_index`), as
    /// image-to-image does; only before the first step. Steps then count from `begin`.
    fn start_at(&mut self, begin: usize) -> Result<()>;
    /// `original` noised with `noise` to the level of timestep index `index` (diffusers'
    /// `add_noise(original, noise, timesteps[index])` after `set_begin_index(index)`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
    /// Advances `sample` by one step. `step_index` must count 0, 1, 2, ... in order; noise (for
    /// stochastic schedulers) is drawn from `noise` with the model output's shape.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The schedulers a request can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler` with `use_karras_sigmas` false).
    DpmSolverMultistep,
    /// The same with Karras sigmas.
    DpmSolverMultistepKarras,
    Lms,
    UniPc,
}

impl SchedulerKind {
    const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::DpmSolverMultistepKarras,
        SchedulerKind::Lms,
        SchedulerKind::UniPc,
    ];

    pub fn all() -> &'static [Self] {
        &Self::ALL
    }

    /// The name requests use.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::DpmSolverMultistep => "dpmpp_2m",
            Self::DpmSolverMultistepKarras => "dpmpp_2m_karras",
            Self::Lms => "lms",
            Self::UniPc => "unipc",
        }
    }

    /// How the class treats `rescale_betas_zero_snr`.
    fn rescale(self) -> numeric::Rescale {
        match self {
            Self::Ddim => numeric::Rescale::Betas,
            Self::Pndm | Self::Lms => numeric::Rescale::NotAParameter,
            _ => numeric::Rescale::BetasAndClampLast,
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The diffusers class.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep | Self::DpmSolverMultistepKarras => {
                "DPMSolverMultistepScheduler"
            }
            Self::Lms => "LMSDiscreteScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
        }
    }

    /// The kind of a diffusers class name (`DPMSolverMultistepScheduler` gives the non-Karras
    /// kind; [`SchedulerConfig::default_kind`] also looks at `use_karras_sigmas`).
    pub fn from_class_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == s)
    }

    /// Values the kind fixes whatever the config says.
    fn overrides(&self) -> Vec<(&'static str, Value)> {
        match self {
            Self::DpmSolverMultistep => vec![("use_karras_sigmas", Value::Bool(false))],
            Self::DpmSolverMultistepKarras => vec![("use_karras_sigmas", Value::Bool(true))],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {reason}")]
    Malformed { origin: String, reason: String },
    #[error(
        "{origin}: scheduler class `{class}` is not supported (supported: {})",
        supported_classes()
    )]
    UnsupportedClass { origin: String, class: String },
    #[error("{origin}: {class}: `{key}`: {reason}")]
    InvalidKey {
        origin: String,
        class: &'static str,
        key: String,
        reason: String,
    },
    #[error("{origin}: {class}: `{key}` = {value} is not supported: {reason}")]
    Unsupported {
        origin: String,
        class: &'static str,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{class}: cannot run {steps} inference steps: {reason}")]
    InvalidSteps {
        class: &'static str,
        steps: usize,
        reason: String,
    },
    #[error("eta must be a finite number between 0 and 1, got {0}")]
    InvalidEta(f64),
}

fn supported_classes() -> String {
    let mut names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
    names.dedup();
    names.join(", ")
}

/// A parsed `scheduler_config.json`.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    origin: String,
    class_name: Option<String>,
    /// Keys `from_config` passes on: private (`_`) keys and those listed in
    /// `_use_default_values` removed.
    values: Map<String, Value>,
    /// Fix-ups seen only by the folder's own class (see [`SchedulerConfig::apply_pipeline_fixups`]).
    own_class_values: Map<String, Value>,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> std::result::Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let value = parse_python_json(&text).map_err(|e| SchedulerError::Malformed {
            origin: origin.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        Self::from_json_with_origin(value, origin)
    }

    pub fn from_json(v: Value) -> std::result::Result<Self, SchedulerError> {
        Self::from_json_with_origin(v, "scheduler config".to_string())
    }

    fn from_json_with_origin(
        v: Value,
        origin: String,
    ) -> std::result::Result<Self, SchedulerError> {
        let Value::Object(map) = v else {
            return Err(SchedulerError::Malformed {
                origin,
                reason: "expected a JSON object".into(),
            });
        };
        let class_name = match map.get("_class_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(SchedulerError::Malformed {
                    origin,
                    reason: format!("`_class_name` must be a string, got {other}"),
                });
            }
        };
        let defaulted: Vec<String> = match map.get("_use_default_values") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(other) => {
                return Err(SchedulerError::Malformed {
                    origin,
                    reason: format!(
                        "`_use_default_values` must be a list of key names, got {other}"
                    ),
                });
            }
        };
        let values = map
            .into_iter()
            .filter(|(k, _)| !k.starts_with('_') && !defaulted.contains(k))
            .collect();
        Ok(Self {
            origin,
            class_name,
            values,
            own_class_values: Map::new(),
        })
    }

    /// `_class_name` of the file, if any.
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }

    /// The folder's own scheduler.
    pub fn default_kind(&self) -> std::result::Result<SchedulerKind, SchedulerError> {
        let Some(class) = self.class_name.as_deref() else {
            return Err(SchedulerError::Malformed {
                origin: self.origin.clone(),
                reason: "no `_class_name`".into(),
            });
        };
        let kind = SchedulerKind::from_class_name(class).ok_or_else(|| {
            SchedulerError::UnsupportedClass {
                origin: self.origin.clone(),
                class: class.to_string(),
            }
        })?;
        if kind == SchedulerKind::DpmSolverMultistep {
            let params = self.params(kind, &[]);
            if params.bool("use_karras_sigmas", false)? {
                return Ok(SchedulerKind::DpmSolverMultistepKarras);
            }
        }
        Ok(kind)
    }

    /// What `StableDiffusionPipeline.__init__` does to the folder's scheduler: a `steps_offset`
    /// other than 1 becomes 1 and a true `clip_sample` becomes false. A key present in the file
    /// changes for every scheduler built from it; a key the file lacks (so the own class used its
    /// default) changes only for the own class, because diffusers' `from_config` drops keys
    /// that were filled with defaults.
    pub fn apply_pipeline_fixups(&mut self) {
        let own = self
            .class_name
            .as_deref()
            .and_then(SchedulerKind::from_class_name);
        for (key, wanted, own_default) in [
            ("steps_offset", Value::from(1), own.map(|_| Value::from(0))),
            (
                "clip_sample",
                Value::Bool(false),
                (own == Some(SchedulerKind::Ddim)).then_some(Value::Bool(true)),
            ),
        ] {
            match self.values.get(key) {
                Some(v) if !json_eq(v, &wanted) => {
                    self.values.insert(key.to_string(), wanted);
                }
                Some(_) => {}
                None => {
                    if own_default.is_some_and(|d| !json_eq(&d, &wanted)) {
                        self.own_class_values.insert(key.to_string(), wanted);
                    }
                }
            }
        }
    }

    /// A scheduler of `kind` set up for `num_inference_steps`. `eta` is DDIM's noise weight
    /// (ignored by other kinds).
    pub fn build(
        &self,
        kind: SchedulerKind,
        num_inference_steps: usize,
        eta: f64,
    ) -> std::result::Result<Box<dyn Scheduler>, SchedulerError> {
        if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
            return Err(SchedulerError::InvalidEta(eta));
        }
        let overrides = kind.overrides();
        let p = self.params(kind, &overrides);
        let steps = StepCount::check(&p, num_inference_steps)?;
        let sched: Box<dyn Scheduler> = match kind {
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&p, steps, eta)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&p, steps)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(&p, steps)?),
            SchedulerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(&p, steps)?),
            SchedulerKind::DpmSolverMultistep | SchedulerKind::DpmSolverMultistepKarras => {
                Box::new(dpm::Dpm::new(&p, steps)?)
            }
            SchedulerKind::Lms => Box::new(lms::Lms::new(&p, steps)?),
            SchedulerKind::UniPc => Box::new(unipc::UniPc::new(&p, steps)?),
        };
        if sched.timesteps().is_empty() {
            return Err(SchedulerError::InvalidSteps {
                class: kind.class_name(),
                steps: num_inference_steps,
                reason: "the config leaves no timesteps".into(),
            });
        }
        Ok(sched)
    }

    /// The `x_0` estimate for previews of generations with scheduler `kind`.
    pub fn denoised_estimate(
        &self,
        kind: SchedulerKind,
    ) -> std::result::Result<DenoisedEstimate, SchedulerError> {
        let overrides = kind.overrides();
        let p = self.params(kind, &overrides);
        Ok(DenoisedEstimate {
            alphas_cumprod: numeric::TrainSchedule::from_params(&p, kind.rescale())?.alphas_cumprod,
            prediction: multistep::Prediction::read(&p)?,
        })
    }

    fn params<'a>(
        &'a self,
        kind: SchedulerKind,
        overrides: &'a [(&'static str, Value)],
    ) -> config::Params<'a> {
        let own = self.class_name.as_deref() == Some(kind.class_name());
        config::Params {
            origin: &self.origin,
            class: kind.class_name(),
            overrides,
            own: own.then_some(&self.own_class_values),
            values: &self.values,
        }
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A validated number of inference steps and the class's train timesteps.
#[derive(Clone, Copy)]
struct StepCount(usize);

impl StepCount {
    fn check(p: &config::Params, n: usize) -> std::result::Result<Self, SchedulerError> {
        let t = p.num_train_timesteps()?;
        let err = |reason: String| SchedulerError::InvalidSteps {
            class: p.class,
            steps: n,
            reason,
        };
        if n == 0 {
            return Err(err("at least 1 step is needed".into()));
        }
        if n > t {
            return Err(err(format!("more than num_train_timesteps ({t})")));
        }
        Ok(Self(n))
    }
}

/// Errors from inside a step, as candle errors.
fn step_error(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// The start of every `step`: checks that `got` is the `expected` step of `total` and that the
/// model output has the sample's shape, and returns the sample and the model output in the
/// work dtype.
fn step_inputs(
    class: &str,
    expected: usize,
    got: usize,
    total: usize,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if got >= total {
        return Err(step_error(format!(
            "{class}: step index {got} is past the last step ({total} timesteps)"
        )));
    }
    if got != expected {
        return Err(step_error(format!(
            "{class}: steps must run in order; expected step {expected}, got {got}"
        )));
    }
    if model_output.shape() != sample.shape() {
        return Err(step_error(format!(
            "{class}: model output shape {:?} differs from sample shape {:?}",
            model_output.shape(),
            sample.shape()
        )));
    }
    Ok((to_work(sample)?, to_work(model_output)?))
}

/// The dtype step arithmetic runs in.
fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn to_work(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(work_dtype(t.dtype()))
}

/// `sum(c * t)`, skipping zero coefficients.
fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, t) in terms {
        if c == 0.0 {
            continue;
        }
        let term = if c == 1.0 {
            t.clone()
        } else {
            t.affine(c, 0.0)?
        };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => terms
            .first()
            .map(|(_, t)| t.zeros_like())
            .unwrap_or_else(|| Err(step_error("empty linear combination"))),
    }
}

/// Gaussian noise like `like`, in the work dtype.
fn draw_noise(noise: &mut dyn NoiseSource, like: &Tensor) -> Result<Tensor> {
    let n = noise.randn(like.shape(), like.device())?;
    if n.shape() != like.shape() {
        return Err(step_error(format!(
            "noise source gave shape {:?}, expected {:?}",
            n.shape(),
            like.shape()
        )));
    }
    n.to_dtype(like.dtype())
}
