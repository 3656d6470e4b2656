//! Device and dtype selection. Every CUDA-specific line of the crate lives here.

use std::sync::OnceLock;

use candle_core::{DType, Device};
use sdserve_generation::AdapterDeclaration;
use serde_json::{Map, Value};

use crate::error::PipelineError;

/// Where to run, as asked for in `parameters.extra.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when this build has CUDA and a GPU answers, else the CPU.
    #[default]
    Auto,
}

/// Precision of the UNet and VAE, as asked for in `parameters.extra.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeRequest {
    F32,
    F16,
    BF16,
    /// F16 on CUDA, F32 on the CPU.
    #[default]
    Auto,
}

/// How to load a model folder.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadOptions {
    pub device: DeviceRequest,
    pub dtype: DTypeRequest,
    /// LoRA adapters read with the model.
    pub adapters: Vec<AdapterDeclaration>,
}

impl LoadOptions {
    /// CPU, F32.
    pub fn cpu() -> Self {
        Self {
            device: DeviceRequest::Cpu,
            dtype: DTypeRequest::F32,
            adapters: Vec::new(),
        }
    }

    /// Reads `device` and `dtype` from model settings' `parameters.extra`; other keys are left to
    /// their owners. Unknown values are errors naming the key.
    pub fn from_extra(extra: &Map<String, Value>) -> Result<Self, PipelineError> {
        let text = |key: &str| -> Result<Option<String>, PipelineError> {
            match extra.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.trim().to_ascii_lowercase())),
                Some(v) => Err(PipelineError::Options(format!(
                    "parameters.extra.{key}: expected a string, found {v}"
                ))),
            }
        };
        let device = match text("device")?.as_deref() {
            Some("cpu") => DeviceRequest::Cpu,
            None | Some("auto") => DeviceRequest::Auto,
            Some("cuda") => DeviceRequest::Cuda(0),
            Some(s) => match s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => DeviceRequest::Cuda(n),
                None => {
                    return Err(PipelineError::Options(format!(
                        "parameters.extra.device: {s:?} is not one of \"cpu\", \"cuda\", \"cuda:N\", \"auto\""
                    )));
                }
            },
        };
        let dtype = match text("dtype")?.as_deref() {
            None | Some("auto") => DTypeRequest::Auto,
            Some("f32" | "float32") => DTypeRequest::F32,
            Some("f16" | "float16" | "fp16") => DTypeRequest::F16,
            Some("bf16" | "bfloat16") => DTypeRequest::BF16,
            Some(s) => {
                return Err(PipelineError::Options(format!(
                    "parameters.extra.dtype: {s:?} is not one of \"f32\", \"f16\", \"bf16\", \"auto\""
                )));
            }
        };
        Ok(Self {
            device,
            dtype,
            adapters: Vec::new(),
        })
    }
}

/// A device and the dtype of the UNet and VAE on it.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
    /// "cpu" or "cuda:N".
    pub device_name: String,
}

impl Placement {
    pub fn resolve(options: &LoadOptions) -> Result<Self, PipelineError> {
        let (device, device_name) = match options.device {
            DeviceRequest::Cpu => (Device::Cpu, "cpu".to_string()),
            DeviceRequest::Cuda(n) => (cuda_device(n)?, format!("cuda:{n}")),
            DeviceRequest::Auto => {
                // A bad SDSERVE_CUDA_TUNING is an error, not a reason to run on the CPU.
                if cfg!(feature = "cuda") {
                    CudaTuning::current()?;
                }
                match cuda_device(0) {
                    Ok(d) => (d, "cuda:0".to_string()),
                    Err(_) => (Device::Cpu, "cpu".to_string()),
                }
            }
        };
        let dtype = match (options.dtype, device.is_cuda()) {
            (DTypeRequest::Auto, true) => DType::F16,
            (DTypeRequest::Auto, false) | (DTypeRequest::F32, _) => DType::F32,
            (DTypeRequest::F16, _) => DType::F16,
            (DTypeRequest::BF16, _) => DType::BF16,
        };
        Ok(Self {
            device,
            dtype,
            device_name,
        })
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }
}

/// The variable that sets the levers of [`CudaTuning`].
pub const CUDA_TUNING_VARIABLE: &str = "SDSERVE_CUDA_TUNING";

/// What this build changes from candle's CUDA defaults: each one a lever the GPU benchmark
/// (`benches/gpu/`) measures against candle's behaviour. `SDSERVE_CUDA_TUNING` changes them:
/// `off` (all off), names with a minus (`-one-stream,-warm-up`) or a plus (`+triton-attention`,
/// off by default until a device run has measured it), applied in order to the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaTuning {
    /// All of a device's work on one stream, with CUDA event tracking off (candle: a stream per
    /// OS thread, and two events recorded per allocation to order them).
    pub one_stream: bool,
    /// Freed device memory stays in the driver's pool for the next allocation (the pool's
    /// default gives it back to the driver at every synchronisation).
    pub keep_freed_memory: bool,
    /// Attention scores formed in F16/BF16 on tensor cores, with F32 accumulation, where the
    /// UNet does not ask for `upcast_attention` (otherwise F32 scores, TF32 products).
    pub half_attention: bool,
    /// The VAE decodes a whole batch at once (the CPU decodes image by image, bounding memory).
    pub batched_vae: bool,
    /// F16 attention without a score matrix in memory: the Triton flash-attention kernel
    /// compiled ahead of time (`attention/triton.rs`) where a variant fits the head dim and GPU.
    pub triton_attention: bool,
    /// One small generation at load, before the model reports ready: the driver compiles
    /// candle's PTX kernels then rather than during the first request.
    pub warm_up: bool,
}

impl CudaTuning {
    pub const DEFAULT: Self = Self {
        one_stream: true,
        keep_freed_memory: true,
        half_attention: true,
        batched_vae: true,
        triton_attention: false,
        warm_up: true,
    };

    /// Every lever off: candle's behaviour, and the CPU's.
    pub const OFF: Self = Self {
        one_stream: false,
        keep_freed_memory: false,
        half_attention: false,
        batched_vae: false,
        triton_attention: false,
        warm_up: false,
    };

    /// Each lever by its name in `SDSERVE_CUDA_TUNING`.
    fn levers(&mut self) -> [(&'static str, &mut bool); 6] {
        [
            ("one-stream", &mut self.one_stream),
            ("keep-freed-memory", &mut self.keep_freed_memory),
            ("half-attention", &mut self.half_attention),
            ("batched-vae", &mut self.batched_vae),
            ("triton-attention", &mut self.triton_attention),
            ("warm-up", &mut self.warm_up),
        ]
    }

    /// Parses the variable's value: a comma list of `default`, `off` (every lever off), `-name`
    /// (off) and `+name` or `name` (on), applied in order to the defaults.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut tuning = Self::DEFAULT;
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (on, name) = match item {
                "default" => {
                    tuning = Self::DEFAULT;
                    continue;
                }
                "off" => {
                    tuning = Self::OFF;
                    continue;
                }
                _ => match (item.strip_prefix('-'), item.strip_prefix('+')) {
                    (Some(name), _) => (false, name),
                    (_, Some(name)) => (true, name),
                    _ => (true, item),
                },
            };
            let mut levers = tuning.levers();
            let known: Vec<&str> = levers.iter().map(|(n, _)| *n).collect();
            match levers.iter_mut().find(|(n, _)| *n == name) {
                Some((_, lever)) => **lever = on,
                None => {
                    return Err(format!(
                        "{CUDA_TUNING_VARIABLE}: {name:?} is not one of {}, \"default\", \"off\"",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(tuning)
    }

    /// This process's levers, read from the environment once.
    pub fn current() -> Result<Self, PipelineError> {
        static TUNING: OnceLock<Result<CudaTuning, String>> = OnceLock::new();
        TUNING
            .get_or_init(|| Self::parse(&std::env::var(CUDA_TUNING_VARIABLE).unwrap_or_default()))
            .clone()
            .map_err(PipelineError::Options)
    }

    /// The levers in force for work on `device`: none on the CPU, and the defaults if the
    /// variable cannot be read (a bad value fails the CUDA load before anything runs).
    pub fn on(device: &Device) -> Self {
        if device.is_cuda() {
            Self::current().unwrap_or(Self::DEFAULT)
        } else {
            Self::OFF
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, PipelineError> {
    let tuning = CudaTuning::current()?;
    let open = |e: &dyn std::fmt::Display| {
        PipelineError::Options(format!("cannot open CUDA device {ordinal}: {e}"))
    };
    let device = if tuning.one_stream {
        Device::new_cuda_with_stream(ordinal)
    } else {
        Device::new_cuda(ordinal)
    }
    .map_err(|e| open(&e))?;
    let cuda = device.as_cuda_device().map_err(|e| open(&e))?;
    if tuning.one_stream {
        // SAFETY: every tensor of this device is made and used on its one stream, in order;
        // events only order uses across streams.
        unsafe { cuda.disable_event_tracking() };
    }
    if tuning.keep_freed_memory {
        // Best effort: without it the pool only gives memory back sooner.
        if let Err(e) = keep_freed_memory(cuda) {
            tracing::warn!(error = %e, "cannot raise the CUDA memory pool's release threshold");
        }
    }
    // Attention with `upcast_attention` (or with half attention off) multiplies in F32; TF32
    // makes those products use tensor cores.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Ok(device)
}

/// Raises the release threshold of the device's default memory pool (where candle's
/// stream-ordered allocations come from) to "never", as PyTorch's caching allocator keeps
/// what it freed: a denoising step frees and allocates the same sizes again.
#[cfg(feature = "cuda")]
fn keep_freed_memory(
    cuda: &candle_core::CudaDevice,
) -> Result<(), candle_core::cuda::cudarc::driver::DriverError> {
    use candle_core::cuda::cudarc::driver::sys;
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let threshold: u64 = u64::MAX;
    // SAFETY: the pool handle is written by the driver before use; the attribute is a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &threshold as *const u64 as *mut std::ffi::c_void,
        )
        .result()
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device, PipelineError> {
    Err(PipelineError::Options(format!(
        "device cuda:{ordinal} requested, but this build has no CUDA support (build with `--features cuda`)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn extra(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_and_rejects_extra() {
        assert_eq!(
            LoadOptions::from_extra(&Map::new()).unwrap(),
            LoadOptions::default()
        );
        let o = LoadOptions::from_extra(&extra(
            json!({"device": "cuda:1", "dtype": "f16", "other": 3}),
        ))
        .unwrap();
        assert_eq!(
            o,
            LoadOptions {
                device: DeviceRequest::Cuda(1),
                dtype: DTypeRequest::F16,
                adapters: Vec::new(),
            }
        );
        for bad in [
            json!({"device": "tpu"}),
            json!({"device": "cuda:x"}),
            json!({"dtype": "int8"}),
            json!({"dtype": 16}),
        ] {
            let err = LoadOptions::from_extra(&extra(bad.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("parameters.extra."), "{bad}: {err}");
        }
    }

    #[test]
    fn tuning_levers_turn_off_by_name() {
        let all = CudaTuning::parse("").unwrap();
        assert_eq!(all, CudaTuning::DEFAULT);
        assert_eq!(CudaTuning::parse("default").unwrap(), CudaTuning::DEFAULT);
        assert!(
            !all.triton_attention,
            "off until a device run has measured it"
        );
        assert!(
            CudaTuning::parse("+triton-attention")
                .unwrap()
                .triton_attention
        );
        let none = CudaTuning::parse("off").unwrap();
        assert!(!none.one_stream && !none.keep_freed_memory && !none.half_attention);
        assert!(!none.batched_vae && !none.warm_up && !none.triton_attention);
        let some = CudaTuning::parse(" -one-stream, -warm-up ").unwrap();
        assert!(!some.one_stream && !some.warm_up);
        assert!(some.keep_freed_memory && some.half_attention && some.batched_vae);
        let only = CudaTuning::parse("off,+half-attention").unwrap();
        assert_eq!(
            only,
            CudaTuning {
                half_attention: true,
                ..none
            }
        );
        let err = CudaTuning::parse("-flash").unwrap_err();
        assert!(
            err.contains("SDSERVE_CUDA_TUNING") && err.contains("\"flash\""),
            "{err}"
        );
        assert!(err.contains("half-attention"), "{err}");
        assert_eq!(CudaTuning::on(&Device::Cpu), none);
    }

    #[test]
    fn cpu_defaults_to_f32() {
        let p = Placement::resolve(&LoadOptions::default()).unwrap();
        assert_eq!((p.dtype, p.device_name.as_str()), (DType::F32, "cpu"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = Placement::resolve(&LoadOptions {
            device: DeviceRequest::Cuda(0),
            dtype: DTypeRequest::Auto,
            adapters: Vec::new(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("no CUDA support"), "{err}");
    }
}
