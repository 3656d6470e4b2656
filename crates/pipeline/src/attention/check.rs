//! The attention kernels of a device against the CPU's, on random operands at the models'
//! attention shapes: the device test the GPU benchmark runs (`sdserve check-kernels`) before it
//! measures, so a kernel that computes something else fails there, by name and shape.

use candle_core::{DType, Device, Tensor};

use super::Kernel;
use crate::noise::NormalStream;

/// One kernel on one shape: its largest error relative to the largest reference value.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub head_dim: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub relative_error: f64,
    /// What the kernel's dtype allows (F16 operands keep about three decimal digits).
    pub limit: f64,
}

impl KernelCheck {
    /// Within its limit (a kernel that could not run has a NaN error and fails).
    pub fn passed(&self) -> bool {
        self.relative_error <= self.limit
    }
}

/// (head dim, heads, queries, keys): SD 1.5's self- and cross-attention at 512² and 256²
/// latents (40/80/160, 8 heads, CLIP's 77 keys), SDXL's (64, 10 and 20 heads), a length that
/// is no multiple of any block, and one query.
const SHAPES: [(usize, usize, usize, usize); 8] = [
    (40, 8, 1024, 1024),
    (40, 8, 4096, 77),
    (80, 8, 256, 256),
    (160, 8, 64, 77),
    (64, 10, 1024, 1024),
    (64, 20, 256, 77),
    (40, 8, 1000, 333),
    (64, 1, 1, 77),
];

/// Every kernel `device` has, on every shape, against the CPU's F32 kernel (itself checked
/// against the F64 formula) on the same F16-rounded operands, two items per batch.
pub fn check_kernels(device: &Device) -> candle_core::Result<Vec<KernelCheck>> {
    // (name, kernel, operand dtype, limit). F16 operands with F32 accumulation keep about three
    // digits. The CPU (a dry run) accumulates F16 products in F16, so there the GPU's F16
    // path runs in F32, which checks its algebra.
    let kernels: &[(&'static str, Kernel, DType, f64)] = if device.is_cuda() {
        &[
            (
                "triton flash attention (f16)",
                Kernel::GpuFlash,
                DType::F16,
                5e-3,
            ),
            ("f16 scores (cuBLAS)", Kernel::GpuHalf, DType::F16, 5e-3),
            ("f32 scores (candle)", Kernel::Generic, DType::F16, 5e-3),
        ]
    } else {
        &[
            (
                "f16-path algebra in f32 (candle)",
                Kernel::GpuHalf,
                DType::F32,
                1e-5,
            ),
            ("f32 scores (candle)", Kernel::Generic, DType::F16, 5e-3),
        ]
    };
    let mut checks = Vec::new();
    for (i, &(d, heads, sq, sk)) in SHAPES.iter().enumerate() {
        let seed = 1000 + 3 * i as u64;
        let operand = |len: usize, seed: u64| -> candle_core::Result<Tensor> {
            let data = NormalStream::new(seed).fill(2 * len * heads * d);
            Tensor::from_vec(data, (2, len, heads * d), &Device::Cpu)?
                .to_dtype(DType::F16)?
                .to_dtype(DType::F32)
        };
        let (q, k, v) = (
            operand(sq, seed)?,
            operand(sk, seed + 1)?,
            operand(sk, seed + 2)?,
        );
        let scale = (d as f64).powf(-0.5);
        let expected = Kernel::CpuF32.run(&q, &k, &v, heads, scale, false)?;
        for &(name, ref kernel, dtype, limit) in kernels {
            let on_device = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
            let (dq, dk, dv) = (on_device(&q)?, on_device(&k)?, on_device(&v)?);
            // The flash kernel on its own: where no variant fits it fails here rather than
            // passing as the kernel it would fall back to.
            let out = match kernel {
                Kernel::GpuFlash => super::flash(&dq, &dk, &dv, heads, scale)?,
                kernel => Some(kernel.run(&dq, &dk, &dv, heads, scale, false)?),
            };
            let relative_error = match out {
                Some(out) => relative_error(
                    &out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                    &expected,
                )?,
                None => f64::NAN,
            };
            checks.push(KernelCheck {
                kernel: name,
                head_dim: d,
                heads,
                queries: sq,
                keys: sk,
                relative_error,
                limit,
            });
        }
    }
    Ok(checks)
}

fn relative_error(ours: &Tensor, expected: &Tensor) -> candle_core::Result<f64> {
    let max = |t: &Tensor| -> candle_core::Result<f64> {
        t.abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar()
    };
    Ok(max(&(ours - expected)?)? / max(expected)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the check runs candle's F16 and F32 paths; both pass at every shape (the
    /// GPU's own kernels are checked on a device by the benchmark).
    #[test]
    fn the_cpus_kernels_pass_their_own_check() {
        let checks = check_kernels(&Device::Cpu).unwrap();
        assert_eq!(checks.len(), 2 * SHAPES.len());
        for c in &checks {
            println!("{c:?}");
            assert!(c.passed(), "{c:?}");
        }
    }
}
