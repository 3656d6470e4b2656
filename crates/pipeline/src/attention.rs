//! Scaled dot-product attention, the one implementation the UNet, the VAE and the text encoder
//! share: `softmax(q kᵀ · scale + mask) v`, computed in F32 whatever the model dtype (as
//! diffusers' default processor upcasts, and as candle's blocks do).
//!
//! Each device and dtype may have its own kernel; [`attention`] picks it. Today the CPU in F32
//! runs the fused kernels of [`crate::layers`] (direct `gemm`, one-pass scaled softmax), and
//! every other device runs candle's ops on the materialised score matrix.

use candle_core::{DType, Result, Tensor};

use crate::layers::{matmul, softmax_scaled};

/// Where attention runs, by the device and dtype of its operands.
enum Kernel {
    /// CPU, F32: the fused layers.
    CpuF32,
    /// Any other device or dtype: candle's ops, upcast to F32.
    Generic,
}

impl Kernel {
    fn for_operands(q: &Tensor) -> Self {
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            Kernel::CpuF32
        } else {
            Kernel::Generic
        }
    }
}

/// Attention over `(batch × heads, sequence, head dim)` operands: `q` `(N, Sq, D)`, `k` and `v`
/// `(N, Sk, D)`. `mask`, when given, is added to the scaled scores (broadcast to `(N, Sq, Sk)`,
/// a large negative value where a query may not look). The result is `(N, Sq, D)` in `q`'s
/// dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let out = match Kernel::for_operands(q) {
        Kernel::CpuF32 => materialised(q, k, v, scale, mask)?,
        Kernel::Generic => materialised(
            &q.to_dtype(DType::F32)?,
            &k.to_dtype(DType::F32)?,
            &v.to_dtype(DType::F32)?,
            scale,
            mask.map(|m| m.to_dtype(DType::F32)).transpose()?.as_ref(),
        )?,
    };
    out.to_dtype(dtype)
}

/// `(B, S, H × D)` → `(B × H, S, D)`: one attention batch item per head.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, dim) = xs.dims3()?;
    xs.reshape((b, s, heads, dim / heads))?
        .transpose(1, 2)?
        .reshape((b * heads, s, dim / heads))
}

/// `(B × H, S, D)` → `(B, S, H × D)`, the inverse of [`split_heads`].
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, s, d) = xs.dims3()?;
    xs.reshape((bh / heads, heads, s, d))?
        .transpose(1, 2)?
        .reshape((bh / heads, s, heads * d))
}

/// The whole `(N, Sq, Sk)` score matrix at once ([`matmul`] and [`softmax_scaled`] run the
/// fused CPU kernels on F32 CPU tensors and candle's ops elsewhere).
fn materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = matmul(q, &k.t()?)?;
    let probs = match mask {
        None => softmax_scaled(&scores, scale)?,
        Some(mask) => softmax_scaled(&(scores * scale)?.broadcast_add(mask)?, 1.0)?,
    };
    matmul(&probs, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::max_diff;
    use candle_core::Device;

    /// The textbook formula, with candle's own ops.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Tensor {
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(m) = mask {
            scores = scores.broadcast_add(m).unwrap();
        }
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn matches_the_formula_with_and_without_a_mask() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (6, 5, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (6, 7, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (6, 7, 8), &dev).unwrap();
        let scale = 8f64.powf(-0.5);
        let ours = attention(&q, &k, &v, scale, None).unwrap();
        assert_eq!(ours.dims(), [6, 5, 8]);
        assert!(max_diff(&ours, &reference(&q, &k, &v, scale, None)) < 1e-5);

        let causal: Vec<f32> = (0..5)
            .flat_map(|i| (0..7).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(causal, (1, 5, 7), &dev).unwrap();
        let ours = attention(&q, &k, &v, scale, Some(&mask)).unwrap();
        let expected = reference(&q, &k, &v, scale, Some(&mask));
        assert!(max_diff(&ours, &expected) < 1e-5);
        // The first query sees only the first key: its output is that value row.
        let first = ours.narrow(1, 0, 1).unwrap();
        assert!(max_diff(&first, &v.narrow(1, 0, 1).unwrap()) < 1e-6);

        // Another dtype runs the generic kernel in F32 and answers in its own dtype.
        let half = attention(
            &q.to_dtype(DType::F16).unwrap(),
            &k.to_dtype(DType::F16).unwrap(),
            &v.to_dtype(DType::F16).unwrap(),
            scale,
            None,
        )
        .unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let half = half.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&half, &reference(&q, &k, &v, scale, None)) < 1e-2);
    }
}
