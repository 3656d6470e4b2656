//! Device and dtype selection. Every CUDA-specific line of the crate lives here.

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
            DeviceRequest::Auto => match cuda_device(0) {
                Ok(d) => (d, "cuda:0".to_string()),
                Err(_) => (Device::Cpu, "cpu".to_string()),
            },
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

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, PipelineError> {
    let device = Device::new_cuda(ordinal)
        .map_err(|e| PipelineError::Options(format!("cannot open CUDA device {ordinal}: {e}")))?;
    // The attention matmuls run in F32; TF32 makes them use tensor cores.
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Ok(device)
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
