//! Scaled dot-product attention, the one implementation the UNet, the VAE and the text encoder
//! share: `softmax(q kᵀ · scale) v`, optionally causal.
//!
//! Operands are `(B, S, H · D)`, as the projections make them: head `h` is columns
//! `h·D .. (h+1)·D`. Each device and dtype may have its own kernel; [`attention`] picks it. The
//! CPU in F32 runs [`tiled`] (no score matrix, heads read in place, parallel over items, heads
//! and query blocks). A GPU with F16/BF16 operands forms the scores in that dtype on tensor
//! cores (F32 accumulation, the scale folded into `q`) unless the caller asks for F32 scores
//! ([`Scores::F32`]: SD 2.x UNets' `upcast_attention`, whose scores overflow F16); with the
//! `triton-attention` lever, F16 runs the flash-attention kernel of [`triton`] instead. Everything
//! else splits the heads out and runs candle's ops on the F32 score matrix.

mod blocks;
pub mod check;
mod softmax;
mod tiled;
mod triton;

use candle_core::{DType, Device, Result, Tensor};

use crate::device::CudaTuning;
use crate::layers::{matmul, softmax_scaled};

/// The precision the caller allows for the scores `q kᵀ` of reduced-precision operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    /// Always F32 (`upcast_attention`).
    F32,
    /// The operands' dtype where the device has a kernel for it, else F32.
    Operands,
}

/// Where attention runs, by the device and dtype of its operands.
enum Kernel {
    /// CPU, F32: the tiled kernel.
    CpuF32,
    /// A GPU, F16: the Triton flash-attention kernel where a variant fits, else `GpuHalf`.
    GpuFlash,
    /// A GPU, F16/BF16 scores: [`half_precision`].
    GpuHalf,
    /// Any other device or dtype: candle's ops, upcast to F32.
    Generic,
}

impl Kernel {
    fn for_operands(q: &Tensor, scores: Scores, causal: bool) -> Self {
        let device = q.device();
        let half = matches!(q.dtype(), DType::F16 | DType::BF16);
        if device.is_cpu() && q.dtype() == DType::F32 {
            Kernel::CpuF32
        } else if half && !causal && scores == Scores::Operands && device.is_cuda() {
            let tuning = CudaTuning::on(device);
            if tuning.triton_attention && q.dtype() == DType::F16 {
                Kernel::GpuFlash
            } else if tuning.half_attention {
                Kernel::GpuHalf
            } else {
                Kernel::Generic
            }
        } else {
            Kernel::Generic
        }
    }
}

/// Multi-head attention: `q` `(B, Sq, H·D)`, `k` `(B, Sk, H·D)` and `v` `(B, Sk, H·Dv)` with
/// `heads` = H. `causal`: query `i` sees keys `0..=i` only (CLIP's text encoder; `Sq == Sk`).
/// The result is `(B, Sq, H·Dv)` in `q`'s dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
    scores: Scores,
) -> Result<Tensor> {
    Kernel::for_operands(q, scores, causal).run(q, k, v, heads, scale, causal)
}

impl Kernel {
    fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        causal: bool,
    ) -> Result<Tensor> {
        let out = match self {
            Kernel::CpuF32 => q.contiguous()?.apply_op3_no_bwd(
                &k.contiguous()?,
                &v.contiguous()?,
                &tiled::Tiled {
                    heads,
                    scale: scale as f32,
                    causal,
                },
            )?,
            Kernel::GpuFlash => match flash(q, k, v, heads, scale) {
                Ok(Some(out)) => out,
                // No variant for these operands, or the kernel could not be loaded or
                // launched: the kernel the levers would take without it.
                fallback => {
                    if let Err(e) = fallback {
                        warn_once_flash_failed(&e);
                    }
                    let kernel = if CudaTuning::on(q.device()).half_attention {
                        Kernel::GpuHalf
                    } else {
                        Kernel::Generic
                    };
                    kernel.run(q, k, v, heads, scale, causal)?
                }
            },
            Kernel::GpuHalf => half_precision(q, k, v, heads, scale)?,
            Kernel::Generic => {
                let split = |t: &Tensor| split_heads(&t.to_dtype(DType::F32)?, heads);
                let (q, k, v) = (split(q)?, split(k)?, split(v)?);
                let mask = causal
                    .then(|| causal_mask(q.dim(1)?, k.dim(1)?, q.device()))
                    .transpose()?;
                merge_heads(&materialised(&q, &k, &v, scale, mask.as_ref())?, heads)?
            }
        };
        out.to_dtype(q.dtype())
    }
}

fn warn_once_flash_failed(e: &candle_core::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(error = %e, "the Triton attention kernel failed; falling back to the F16 scores kernel")
    });
}

/// The Triton kernel, where this build has CUDA and a variant fits.
#[cfg(feature = "cuda")]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    triton::flash_attention(q, k, v, heads, scale)
}

#[cfg(not(feature = "cuda"))]
fn flash(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Attention in the operands' (reduced) dtype: the products on tensor cores accumulate in
/// F32 (cuBLAS's compute type for F16 and BF16) and the softmax sums in F32 (candle's kernel).
/// Scaling `q` first keeps the stored scores in the range the softmax sees.
fn half_precision(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let q = split_heads(&(q * scale)?, heads)?;
    let (k, v) = (split_heads(k, heads)?, split_heads(v, heads)?);
    merge_heads(
        &by_score_chunks(&q, &k, &v, |q, k, v| {
            candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v)
        })?,
        heads,
    )
}

/// Runs `f` on slices of the `(N, S, D)` attention batch small enough that each slice's score
/// matrix has fewer than 2³¹ elements: candle's GPU softmax indexes with `i32` (a VAE
/// mid-block over 128² latents has 2²⁸ scores per image, so a batch of 8 would overflow).
fn by_score_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    in_chunks_of(i32::MAX as usize, q, k, v, f)
}

/// [`by_score_chunks`] with at most `max_scores` scores per slice (at least one item).
fn in_chunks_of(
    max_scores: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, sq, _) = q.dims3()?;
    let sk = k.dim(1)?;
    let per_item = (sq * sk).max(1);
    let chunk = (max_scores / per_item).max(1);
    if chunk >= n {
        return f(q, k, v);
    }
    let parts = (0..n)
        .step_by(chunk)
        .map(|i| {
            let len = chunk.min(n - i);
            f(
                &q.narrow(0, i, len)?,
                &k.narrow(0, i, len)?,
                &v.narrow(0, i, len)?,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// `(1, Sq, Sk)`: 0 where a query may look, F32's lowest value above the diagonal (as HF's
/// CLIP builds it).
fn causal_mask(sq: usize, sk: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..sq)
        .flat_map(|i| (0..sk).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, sq, sk), device)
}

/// `(B, S, H × D)` → `(B × H, S, D)`: one attention batch item per head.
fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, dim) = xs.dims3()?;
    xs.reshape((b, s, heads, dim / heads))?
        .transpose(1, 2)?
        .reshape((b * heads, s, dim / heads))
}

/// `(B × H, S, D)` → `(B, S, H × D)`, the inverse of [`split_heads`].
fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, s, d) = xs.dims3()?;
    xs.reshape((bh / heads, heads, s, d))?
        .transpose(1, 2)?
        .reshape((bh / heads, s, heads * d))
}

/// The `(N, Sq, Sk)` score matrix (in slices of fewer than 2³¹ scores), `mask` added to the
/// scaled scores.
fn materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    by_score_chunks(q, k, v, |q, k, v| {
        let scores = matmul(q, &k.t()?)?;
        let probs = match mask {
            None => softmax_scaled(&scores, scale)?,
            Some(mask) => softmax_scaled(&(scores * scale)?.broadcast_add(mask)?, 1.0)?,
        };
        matmul(&probs, v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formula in F64, with candle's own ops, head by head.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
        causal: bool,
    ) -> Tensor {
        let f64 = |t: &Tensor| split_heads(&t.to_dtype(DType::F64).unwrap(), heads).unwrap();
        let (q, k, v) = (f64(q), f64(k), f64(v));
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if causal {
            let mask = causal_mask(q.dim(1).unwrap(), k.dim(1).unwrap(), q.device()).unwrap();
            scores = scores
                .broadcast_add(&mask.to_dtype(DType::F64).unwrap())
                .unwrap();
        }
        let out = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        merge_heads(&out, heads).unwrap()
    }

    /// Largest |ours − reference| over the largest |reference|.
    fn relative_error(ours: &Tensor, expected: &Tensor) -> f64 {
        let ours = ours.to_dtype(DType::F64).unwrap();
        let max = |t: &Tensor| -> f64 {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        max(&(&ours - expected).unwrap()) / max(expected)
    }

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let data = crate::noise::NormalStream::new(seed).fill(shape.0 * shape.1 * shape.2);
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn tiled_matches_the_formula_for_the_models_sizes() {
        // Head dims of the tiny models (8, 16), SD 1.x (40, 80, 160), SD 2.x / SDXL / CLIP (64) and the
        // VAE (one head over 512 channels); lengths around the query block (64), CLIP's 77,
        // and key counts past one key block with a remainder: (head dim, heads, queries, keys).
        let cases: &[(usize, usize, usize, usize)] = &[
            (8, 2, 1, 77),
            (8, 4, 64, 64),
            (16, 4, 100, 600),
            (40, 8, 65, 77),
            (40, 2, 300, 300),
            (64, 3, 63, 1030),
            (80, 2, 130, 77),
            (160, 2, 129, 129),
            (512, 1, 70, 70),
        ];
        for (i, &(d, heads, sq, sk)) in cases.iter().enumerate() {
            let seed = i as u64;
            let q = random((2, sq, heads * d), 3 * seed);
            let k = random((2, sk, heads * d), 3 * seed + 1);
            let v = random((2, sk, heads * d), 3 * seed + 2);
            let scale = (d as f64).powf(-0.5);
            let ours = attention(&q, &k, &v, heads, scale, false, Scores::Operands).unwrap();
            assert_eq!(ours.dims(), [2, sq, heads * d]);
            let err = relative_error(&ours, &reference(&q, &k, &v, heads, scale, false));
            println!("d {d} x {heads} heads, {sq} queries, {sk} keys: relative error {err:.1e}");
            assert!(
                err < 1e-5,
                "d {d}, {sq} queries, {sk} keys: relative error {err:e}"
            );
        }
    }

    #[test]
    fn causal_attention_sees_only_earlier_keys() {
        for (d, heads, s) in [(8, 1, 5), (64, 12, 77), (16, 2, 130)] {
            let q = random((3, s, heads * d), 11);
            let k = random((3, s, heads * d), 12);
            let v = random((3, s, heads * d), 13);
            let scale = (d as f64).powf(-0.5);
            let ours = attention(&q, &k, &v, heads, scale, true, Scores::Operands).unwrap();
            let err = relative_error(&ours, &reference(&q, &k, &v, heads, scale, true));
            assert!(err < 1e-5, "d {d}, {s} tokens: relative error {err:e}");
            // The first query sees only the first key: its output is that value row.
            let first = ours.narrow(1, 0, 1).unwrap();
            let err = relative_error(
                &first,
                &v.narrow(1, 0, 1).unwrap().to_dtype(DType::F64).unwrap(),
            );
            assert!(err < 1e-6, "{err:e}");
        }
    }

    #[test]
    fn other_dtypes_run_the_generic_kernel_and_keep_their_dtype() {
        let (q, k, v) = (
            random((2, 9, 16), 1),
            random((2, 7, 16), 2),
            random((2, 7, 16), 3),
        );
        let scale = 0.25;
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let out = attention(
            &half(&q),
            &half(&k),
            &half(&v),
            2,
            scale,
            false,
            Scores::Operands,
        )
        .unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let err = relative_error(&out, &reference(&q, &k, &v, 2, scale, false));
        assert!(err < 1e-2, "{err:e}");
    }

    /// Slicing the attention batch changes nothing: 5 items of 6 × 7 scores, 2 items a slice.
    #[test]
    fn score_chunks_give_the_whole_batchs_result() {
        let (q, k, v) = (
            random((5, 6, 8), 1),
            random((5, 7, 8), 2),
            random((5, 7, 8), 3),
        );
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v)
        };
        let whole = f(&q, &k, &v).unwrap();
        let sliced = in_chunks_of(2 * 6 * 7 + 5, &q, &k, &v, f).unwrap();
        assert_eq!(sliced.dims(), whole.dims());
        assert!(relative_error(&sliced, &whole.to_dtype(DType::F64).unwrap()) < 1e-6);
    }

    /// The GPU's F16/BF16 kernel is device-independent candle ops: here on the CPU, at the
    /// models' head dims, against the F64 formula.
    #[test]
    fn half_precision_attention_is_the_formula() {
        for (i, &(d, heads, sq, sk)) in [
            (40, 8, 65, 77),
            (64, 2, 300, 300),
            (80, 2, 130, 77),
            (160, 1, 129, 129),
            (512, 1, 70, 70),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 + 3 * i as u64;
            let q = random((2, sq, heads * d), seed);
            let k = random((2, sk, heads * d), seed + 1);
            let v = random((2, sk, heads * d), seed + 2);
            let scale = (d as f64).powf(-0.5);
            let expected = reference(&q, &k, &v, heads, scale, false);
            // In F32 the algebra (scale folded into q, heads split and merged) is exact up to
            // F32 rounding; in F16/BF16 the CPU's candle also accumulates in the reduced
            // dtype (a GPU accumulates in F32: `check.rs` measures that on a device), so
            // only gross errors show there.
            for (dtype, limit) in [(DType::F32, 1e-5), (DType::F16, 1e-1), (DType::BF16, 2e-1)] {
                let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let out = half_precision(&cast(&q), &cast(&k), &cast(&v), heads, scale).unwrap();
                assert_eq!(
                    (out.dims(), out.dtype()),
                    ([2, sq, heads * d].as_slice(), dtype)
                );
                let err = relative_error(&out, &expected);
                println!("{dtype:?} d {d} x {heads}, {sq} x {sk}: relative error {err:.1e}");
                assert!(err < limit, "{dtype:?} d {d}: relative error {err:e}");
            }
        }
    }
}
