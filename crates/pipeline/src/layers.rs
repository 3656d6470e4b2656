//! Linear, group norm (optionally fused with SiLU), GEGLU, softmax, matrix products and resnet
//! blocks, with fused CPU kernels (convolution: [`crate::conv`]).
//!
//! candle 0.11.1's CPU conv2d re-packs its kernel and copies the input to NHWC on every call,
//! each of its matmuls probes the thread count by reading `/proc/cpuinfo`, and its group norm,
//! GEGLU and softmax are chains of full-tensor ops with scalar `exp`/`erf`, the larger of which
//! wake a spinning worker pool. At the UNet's and VAE's sizes that overhead is most of a
//! denoising step. On the CPU in F32 these layers run as one custom op each (a convolution as
//! im2col plus one `gemm` call); on other devices and dtypes they run candle's own ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor,
    bail,
};
use candle_nn::{Conv2dConfig, VarBuilder};

use rayon::prelude::*;

use crate::conv::{Conv2d, conv2d};
use crate::simd::dispatch;

fn fast_path(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: expected f32 storage")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// `lhs @ rhs`. On the CPU in F32, rank 2 or 3 operands of any strides (broadcast batches too)
/// go straight to `gemm`, which saves candle's per-call thread-count probe (it reads
/// `/proc/cpuinfo`) and lets the split across threads follow [`gemm_parallelism`].
pub fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if fast_path(lhs)
        && rhs.dtype() == DType::F32
        && lhs.rank() == rhs.rank()
        && (2..=3).contains(&lhs.rank())
    {
        lhs.apply_op2_no_bwd(rhs, &MatMul)
    } else {
        lhs.matmul(rhs)
    }
}

/// One thread for small products, and inside a parallel region (whose other threads are
/// already busy); otherwise all of rayon's.
pub(crate) fn gemm_parallelism(flops: usize) -> gemm::Parallelism {
    const PARALLEL_MIN_FLOPS: usize = 1 << 22;
    let threads = rayon::current_num_threads();
    if flops < PARALLEL_MIN_FLOPS || threads < 2 || rayon::current_thread_index().is_some() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// `(batch, rows, cols, batch stride, row stride, col stride)` of a rank 2 or 3 layout.
fn matrix_dims(layout: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
    match (layout.dims(), layout.stride()) {
        (&[r, c], &[rs, cs]) => Ok((1, r, c, 0, rs, cs)),
        (&[b, r, c], &[bs, rs, cs]) => Ok((b, r, c, bs, rs, cs)),
        (dims, _) => bail!("matmul: expected a rank 2 or 3 operand, got {dims:?}"),
    }
}

struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        lhs: &CpuStorage,
        lhs_l: &Layout,
        rhs: &CpuStorage,
        rhs_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(lhs), CpuStorage::F32(rhs)) = (lhs, rhs) else {
            bail!("matmul: expected f32 storage")
        };
        let (batch, m, k, lhs_bs, lhs_rs, lhs_cs) = matrix_dims(lhs_l)?;
        let (rhs_batch, rhs_k, n, rhs_bs, rhs_rs, rhs_cs) = matrix_dims(rhs_l)?;
        if rhs_batch != batch || rhs_k != k {
            bail!(
                "matmul: shapes {:?} and {:?} do not match",
                lhs_l.dims(),
                rhs_l.dims()
            )
        }
        // Every element the strided views address must lie in the buffers.
        let last = |start: usize, dims: [usize; 3], strides: [usize; 3]| {
            start
                + (0..3)
                    .map(|i| dims[i].saturating_sub(1) * strides[i])
                    .sum::<usize>()
        };
        let lhs_end = last(
            lhs_l.start_offset(),
            [batch, m, k],
            [lhs_bs, lhs_rs, lhs_cs],
        );
        let rhs_end = last(
            rhs_l.start_offset(),
            [batch, k, n],
            [rhs_bs, rhs_rs, rhs_cs],
        );
        if m * n * k > 0 && (lhs_end >= lhs.len() || rhs_end >= rhs.len()) {
            bail!("matmul: strided view out of its buffer")
        }
        let mut dst = vec![0f32; batch * m * n];
        if m * n * k == 0 {
            let dims = lhs_l.dims();
            let mut shape = dims[..dims.len() - 1].to_vec();
            shape.push(n);
            return Ok((CpuStorage::F32(dst), Shape::from(shape)));
        }
        let parallelism = gemm_parallelism(2 * m * n * k);
        for (i, out) in dst.chunks_exact_mut(m * n).enumerate() {
            // SAFETY: the views were checked to lie inside `lhs` and `rhs`, `out` holds the
            // row-major m x n result, and `read_dst` is false so `out` is only written.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr().add(lhs_l.start_offset() + i * lhs_bs),
                    lhs_cs as isize,
                    lhs_rs as isize,
                    rhs.as_ptr().add(rhs_l.start_offset() + i * rhs_bs),
                    rhs_cs as isize,
                    rhs_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
        let dims = lhs_l.dims();
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }
}

/// A linear layer whose product runs [`matmul`].
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(inner.weight().clone(), inner.bias().cloned()))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(inner.weight().clone(), None))
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !fast_path(xs) {
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(xs);
        }
        // All leading axes fold into the rows of one product.
        let mut shape = xs.dims().to_vec();
        let k = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / k.max(1);
        let out = matmul(&xs.contiguous()?.reshape((rows, k))?, &self.weight.t()?)?;
        let out = match &self.bias {
            Some(bias) => out.broadcast_add(bias)?,
            None => out,
        };
        if let Some(last) = shape.last_mut() {
            *last = out.dim(1)?;
        }
        out.reshape(shape)
    }
}

/// Group norm over `(B, C, ...)`, optionally followed by SiLU.
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if !fast_path(xs) || xs.rank() < 3 {
            let normed = self.inner.forward(xs)?;
            return if silu {
                candle_nn::ops::silu(&normed)
            } else {
                Ok(normed)
            };
        }
        xs.contiguous()?.apply_op3_no_bwd(
            &self.weight,
            &self.bias,
            &GroupNormOp {
                groups: self.groups,
                eps: self.eps as f32,
                silu,
            },
        )
    }

    /// `silu(group_norm(xs))`, as every resnet and the output heads apply it.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

/// Sum of `f(x)` with eight independent accumulators, so that it vectorises.
#[inline(always)]
pub(crate) fn sum_of(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// An output buffer written by several parallel tasks at once, each in elements no other task
/// touches (the kernels' own chunks, heads or blocks).
#[derive(Clone, Copy)]
pub(crate) struct DisjointOutput(pub(crate) *mut f32);

// SAFETY: users write disjoint elements only, and the buffer outlives the parallel loop.
unsafe impl Send for DisjointOutput {}
unsafe impl Sync for DisjointOutput {}

impl DisjointOutput {
    /// The element `offset` floats in.
    ///
    /// # Safety
    /// `offset` lies inside the buffer.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// Maximum with sixteen independent accumulators, so that it vectorises (NaNs are not kept).
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.into_iter().fold(tail, f32::max)
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        weight: &CpuStorage,
        weight_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(xs, xs_l, "group norm")?;
        let weight = f32_slice(weight, weight_l, "group norm weight")?;
        let bias = f32_slice(bias, bias_l, "group norm bias")?;
        let dims = xs_l.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        if !channels.is_multiple_of(self.groups)
            || weight.len() != channels
            || bias.len() != channels
        {
            bail!(
                "group norm: {channels} channels, {} groups, {} weights, {} biases",
                self.groups,
                weight.len(),
                bias.len()
            )
        }
        let per_group = channels / self.groups;
        let group_len = per_group * spatial;
        let mut dst = vec![0f32; src.len()];
        let (eps, silu) = (self.eps, self.silu);
        src.par_chunks_exact(group_len)
            .zip(dst.par_chunks_exact_mut(group_len))
            .enumerate()
            .for_each(|(g, (xs, ys))| {
                let first = (g % self.groups) * per_group;
                let channels = first..first + per_group;
                let (weight, bias) = (&weight[channels.clone()], &bias[channels]);
                normalize_group(xs, ys, weight, bias, spatial, eps, silu);
            });
        Ok((CpuStorage::F32(dst), xs_l.shape().clone()))
    }
}

dispatch! {
    /// One group of `weight.len()` channels of `spatial` values: normalised, scaled and
    /// shifted per channel, then SiLU when `silu`.
    fn normalize_group(
        xs: &[f32],
        ys: &mut [f32],
        weight: &[f32],
        bias: &[f32],
        spatial: usize,
        eps: f32,
        silu: bool,
    ) {
        let n = xs.len() as f32;
        let mean = sum_of(xs, |x| x) / n;
        let var = sum_of(xs, |x| (x - mean) * (x - mean)) / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for (c, (xs, ys)) in xs.chunks_exact(spatial).zip(ys.chunks_exact_mut(spatial)).enumerate() {
            let scale = weight[c] * inv_std;
            let shift = bias[c];
            for (y, &x) in ys.iter_mut().zip(xs) {
                *y = (x - mean) * scale + shift;
            }
            if silu {
                for y in ys.iter_mut() {
                    *y /= 1.0 + exp(-*y);
                }
            }
        }
    }
}

/// diffusers' `GEGLU`: a projection to `2 * out` features, then `a * gelu_erf(b)` of its two
/// halves (exact erf GELU).
pub struct Geglu {
    proj: Linear,
    /// `proj` without its bias, which the fused kernel adds.
    proj_no_bias: Linear,
}

pub fn geglu(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Geglu> {
    let proj = linear(in_dim, out_dim * 2, vb)?;
    let proj_no_bias = Linear::new(proj.weight.clone(), None);
    Ok(Geglu { proj, proj_no_bias })
}

impl Module for Geglu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.proj.bias {
            Some(bias) if fast_path(xs) => self
                .proj_no_bias
                .forward(xs)?
                .contiguous()?
                .apply_op2_no_bwd(bias, &GegluOp),
            _ => {
                let halves = self.proj.forward(xs)?.chunk(2, D::Minus1)?;
                &halves[0] * halves[1].gelu_erf()?
            }
        }
    }
}

/// `(a + bias_a) * gelu_erf(b + bias_b)` over the halves `a`, `b` of the last axis.
struct GegluOp;

impl CustomOp2 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(xs, xs_l, "geglu")?;
        let bias = f32_slice(bias, bias_l, "geglu bias")?;
        let mut dims = xs_l.dims().to_vec();
        let Some(last) = dims
            .last_mut()
            .filter(|d| **d % 2 == 0 && **d == bias.len())
        else {
            bail!(
                "geglu: {:?} does not fit a bias of {}",
                xs_l.dims(),
                bias.len()
            )
        };
        let half = *last / 2;
        *last = half;
        let (bias_a, bias_b) = bias.split_at(half);
        let mut dst = vec![0f32; src.len() / 2];
        // Rows in tasks of about 64 Ki outputs.
        let rows = (65536 / half.max(1)).max(1);
        src.par_chunks(2 * half * rows)
            .zip(dst.par_chunks_mut(half * rows))
            .for_each(|(src, dst)| geglu_rows(src, dst, bias_a, bias_b));
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

dispatch! {
    /// `(a + bias_a) · gelu_erf(b + bias_b)` for rows `[a | b]` of `src`.
    fn geglu_rows(src: &[f32], dst: &mut [f32], bias_a: &[f32], bias_b: &[f32]) {
        let half = bias_a.len();
        for (row, out) in src.chunks_exact(2 * half).zip(dst.chunks_exact_mut(half)) {
            let (a, b) = row.split_at(half);
            // Two plain loops, so that both vectorise.
            for ((y, &b), &bias) in out.iter_mut().zip(b).zip(bias_b) {
                *y = gelu_erf(b + bias);
            }
            for ((y, &a), &bias) in out.iter_mut().zip(a).zip(bias_a) {
                *y *= a + bias;
            }
        }
    }
}

/// diffusers' `ResnetBlock2D` (default time-embedding shift, SiLU).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, in_channels: usize, c: &ResnetConfig) -> Result<Self> {
        let out = c.out_channels;
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if in_channels != out {
            Some(conv2d(
                in_channels,
                out,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        let time_emb_proj = c
            .temb_channels
            .map(|t| linear(t, out, vb.pp("time_emb_proj")))
            .transpose()?;
        Ok(Self {
            norm1: group_norm(c.groups, in_channels, c.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out, 3, conv3, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(c.groups, out, c.eps, vb.pp("norm2"))?,
            conv2: conv2d(out, out, 3, conv3, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let mut hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(temb), Some(proj)) = (temb, &self.time_emb_proj) {
            let temb = proj.forward(&candle_nn::ops::silu(temb)?)?;
            hidden = hidden.broadcast_add(&temb.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        }
        let hidden = self.conv2.forward(&self.norm2.forward_silu(&hidden)?)?;
        let out = (shortcut + hidden)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `softmax(xs * scale)` over the last axis (`scale > 0`).
pub fn softmax_scaled(xs: &Tensor, scale: f64) -> Result<Tensor> {
    if !fast_path(xs) {
        return candle_nn::ops::softmax_last_dim(&(xs * scale)?);
    }
    xs.contiguous()?
        .apply_op1_no_bwd(&SoftmaxScaled(scale as f32))
}

struct SoftmaxScaled(f32);

impl CustomOp1 for SoftmaxScaled {
    fn name(&self) -> &'static str {
        "softmax-scaled"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout, "softmax")?;
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        for (xs, ys) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            let max = max_of(xs);
            for (y, &x) in ys.iter_mut().zip(xs) {
                *y = exp((x - max) * self.0);
            }
            let inv_sum = 1.0 / sum_of(ys, |y| y);
            for y in ys.iter_mut() {
                *y *= inv_sum;
            }
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// The exact (erf) GELU, `x / 2 * (1 + erf(x / sqrt 2))`, in a form the compiler vectorises
/// (libm's `erff` is a scalar call per element): `erfc(z) = t e^(-z^2 + P(t))`,
/// `t = 1 / (1 + z / 2)`, whose relative error is below 1.2e-7 for every `z >= 0`
/// (Numerical Recipes' `erfcc`), so `1 + erf` is within a few ulp of the exact value.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p * t + c;
    }
    let erfc = t * exp(p - z * z);
    // 1 + erf(x) is 2 - erfc(|x|) for x >= 0 and erfc(|x|) below.
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// `e^x` within about one ulp of libm's `expf`, in a form the compiler vectorises (libm's is a
/// scalar call per element): `x = n ln2 + r`, a degree-6 polynomial for `e^r` (Cephes' `expf`)
/// and `2^n` written into the exponent bits. Underflows to 0 below -87.3; saturates above 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.3;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(MIN, 88.0);
    let rounded = xc * std::f32::consts::LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `rounded`'s low mantissa bits hold n; integer arithmetic on them vectorises, where a
    // saturating `n as i32` does not.
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < MIN { 0.0 } else { e_r * two_n }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// Largest |a - b| over every element (also used by the attention tests).
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn exp_is_within_rounding_of_std() {
        for i in 0..=200_000 {
            let x = -90.0 + i as f32 * (180.0 / 200_000.0);
            let (fast, exact) = (exp(x), (x as f64).exp());
            if x < -87.3 {
                assert_eq!(fast, 0.0, "{x}");
            } else if x <= 88.0 {
                let rel = ((fast as f64 - exact) / exact).abs();
                assert!(rel < 2.5e-7, "exp({x}) = {fast}, expected {exact}: {rel:e}");
            }
        }
    }

    #[test]
    fn gelu_is_within_rounding_of_exact() {
        for i in 0..=200_000 {
            let x = -12.0 + i as f32 * (24.0 / 200_000.0);
            let x64 = x as f64;
            let exact = 0.5 * x64 * (1.0 + candle_core::cpu::erf::erf_f64(x64 / 2f64.sqrt()));
            let err = (gelu_erf(x) as f64 - exact).abs();
            assert!(err < 2.5e-7 * x64.abs().max(1.0), "gelu({x}): {err:e}");
        }
    }

    #[test]
    fn fused_layers_match_candle_ops() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let xs = randn(&[2, 8, 5, 3]);
        let norm = group_norm(4, 8, 1e-5, vb.pp("norm")).unwrap();
        // Non-trivial affine parameters.
        let norm = GroupNorm {
            weight: randn(&[8]),
            bias: randn(&[8]),
            ..norm
        };
        let inner =
            candle_nn::GroupNorm::new(norm.weight.clone(), norm.bias.clone(), 8, 4, 1e-5).unwrap();
        let expected = inner.forward(&xs).unwrap();
        assert!(max_diff(&norm.forward(&xs).unwrap(), &expected) < 1e-5);
        let expected_silu = candle_nn::ops::silu(&expected).unwrap();
        assert!(max_diff(&norm.forward_silu(&xs).unwrap(), &expected_silu) < 1e-5);

        let ff = geglu(6, 4, vb.pp("geglu")).unwrap();
        let xs = randn(&[2, 3, 6]);
        let halves = ff.proj.forward(&xs).unwrap().chunk(2, D::Minus1).unwrap();
        let expected = (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&ff.forward(&xs).unwrap(), &expected) < 1e-5);

        let (a, b) = (randn(&[3, 5, 4]), randn(&[3, 6, 4]));
        let bt = b.t().unwrap();
        let expected = a.matmul(&bt).unwrap();
        assert!(max_diff(&matmul(&a, &bt).unwrap(), &expected) < 1e-5);
        let w = randn(&[5, 4]);
        let expected = w
            .broadcast_left(3)
            .unwrap()
            .contiguous()
            .unwrap()
            .matmul(&bt)
            .unwrap();
        let broadcast = matmul(&w.broadcast_as((3, 5, 4)).unwrap(), &bt).unwrap();
        assert!(max_diff(&broadcast, &expected) < 1e-5);
        let lin = linear(4, 6, vb.pp("linear")).unwrap();
        let inner = candle_nn::Linear::new(lin.weight.clone(), lin.bias.clone());
        assert!(max_diff(&lin.forward(&a).unwrap(), &inner.forward(&a).unwrap()) < 1e-5);

        let scores = (randn(&[2, 3, 7]) * 4.0).unwrap();
        let expected = candle_nn::ops::softmax_last_dim(&(&scores * 0.3).unwrap()).unwrap();
        assert!(max_diff(&softmax_scaled(&scores, 0.3).unwrap(), &expected) < 1e-6);
    }
}
