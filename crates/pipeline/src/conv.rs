//! 2D convolution. On the CPU in F32 (groups 1, dilation 1) it runs as one custom op that
//! writes the output in chunks of output rows: each chunk's im2col patch matrix (bounded to
//! [`CHUNK_ELEMS`] floats, so a 512×512 VAE layer never needs its full 1 GiB patch matrix) is
//! multiplied straight into its columns of the output, bias included, and the chunks run in
//! parallel. 3×3 convolutions with stride 1 and padding 1 on large enough inputs take
//! [`winograd`] instead. Elsewhere it is candle's convolution.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::layers::{DisjointOutput as Output, f32_slice, gemm_parallelism};
use crate::memory::with_scratch;

mod winograd;

/// Most floats in one chunk's patch matrix (16 MiB): large enough that a layer's weight is
/// packed for the product only a few times, small enough to be reused by the allocator rather
/// than mapped anew.
pub const CHUNK_ELEMS: usize = 1 << 22;

/// A 2D convolution.
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The weight as the `(c_out, c_in * kh * kw)` matrix the patch columns multiply.
    weight_2d: Tensor,
    /// The bias, zeros when the layer has none.
    bias: Tensor,
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)?;
    let weight_2d = inner.weight().flatten_from(1)?.contiguous()?;
    let bias = match inner.bias() {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(out_channels, weight_2d.dtype(), weight_2d.device())?,
    };
    Ok(Conv2d {
        inner,
        weight_2d,
        bias,
    })
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        let cpu_f32 = xs.device().is_cpu() && xs.dtype() == DType::F32;
        if !cpu_f32 || cfg.groups != 1 || cfg.dilation != 1 {
            return self.inner.forward(xs);
        }
        let (_, _, h, w) = xs.dims4()?;
        let (_, _, kh, kw) = self.inner.weight().dims4()?;
        if h + 2 * cfg.padding < kh || w + 2 * cfg.padding < kw {
            return self.inner.forward(xs);
        }
        let op = ConvOp {
            kh,
            kw,
            stride: cfg.stride,
            padding: cfg.padding,
            chunk_elems: CHUNK_ELEMS,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight_2d, &self.bias, &op)
    }
}

/// The convolution of `(B, C, H, W)` by a `(C_out, C·kh·kw)` weight plus a `(C_out)` bias.
struct ConvOp {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    /// Most floats in one chunk's patch matrix.
    chunk_elems: usize,
}

/// The sizes of one convolution.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    h: usize,
    w: usize,
    c_out: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    /// Rows of the patch matrix: `C · kh · kw`.
    fn k(&self, op: &ConvOp) -> usize {
        self.c * op.kh * op.kw
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-chunked"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(x, x_l, "conv2d input")?;
        let weight = f32_slice(w, w_l, "conv2d weight")?;
        let bias = f32_slice(b, b_l, "conv2d bias")?;
        let (batch, c, h, w) = x_l.shape().dims4()?;
        let (c_out, k) = w_l.shape().dims2()?;
        let d = Dims {
            c,
            h,
            w,
            c_out,
            oh: (h + 2 * self.padding - self.kh) / self.stride + 1,
            ow: (w + 2 * self.padding - self.kw) / self.stride + 1,
        };
        if k != d.k(self) || bias.len() != c_out {
            bail!(
                "conv2d: weight {:?} and bias {:?} do not fit input {:?}",
                w_l.dims(),
                b_l.dims(),
                x_l.dims()
            )
        }
        let n = d.oh * d.ow;
        let shape = Shape::from((batch, c_out, d.oh, d.ow));
        if winograd::applies(
            (self.kh, self.kw),
            self.stride,
            self.padding,
            (c, c_out),
            batch * n,
        ) {
            let out = winograd::conv(x, (batch, c, h, w), weight, bias);
            return Ok((CpuStorage::F32(out), shape));
        }
        let mut out = vec![0f32; batch * c_out * n];
        let rows = (self.chunk_elems / (k * d.ow).max(1)).clamp(1, d.oh);
        let chunks: Vec<(usize, usize)> = (0..batch)
            .flat_map(|i| (0..d.oh).step_by(rows).map(move |oy| (i, oy)))
            .collect();
        // One chunk alone may split its product across threads; several share them out.
        let single = chunks.len() == 1;
        let dst = Output(out.as_mut_ptr());
        chunks.par_iter().for_each(|&(i, oy0)| {
            let oy1 = (oy0 + rows).min(d.oh);
            let plane = &x[i * c * h * w..][..c * h * w];
            // A pointwise convolution multiplies the image itself: no patch matrix.
            let cols = if self.pointwise() {
                0
            } else {
                k * (oy1 - oy0) * d.ow
            };
            with_scratch([cols], |[cols]| {
                // SAFETY: item `i`'s output starts at `i * c_out * n` inside `out`, and
                // this chunk writes only its columns `oy0 * ow .. oy1 * ow` of each row.
                unsafe {
                    let dst = dst.at(i * c_out * n);
                    self.chunk(&d, plane, weight, bias, oy0..oy1, cols, dst, single);
                }
            })
        });
        Ok((CpuStorage::F32(out), shape))
    }
}

impl ConvOp {
    fn pointwise(&self) -> bool {
        (self.kh, self.kw, self.stride, self.padding) == (1, 1, 1, 0)
    }

    /// Output rows `oy` of one item: bias, then `weight · patches` added on top.
    ///
    /// # Safety
    /// `dst` is the item's `(c_out, oh · ow)` output, and no one else writes columns `oy`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunk(
        &self,
        d: &Dims,
        plane: &[f32],
        weight: &[f32],
        bias: &[f32],
        oy: std::ops::Range<usize>,
        cols: &mut [f32],
        dst: *mut f32,
        single: bool,
    ) {
        let n = d.oh * d.ow;
        let ncols = oy.len() * d.ow;
        let first = oy.start * d.ow;
        // SAFETY (here and in the product below): the chunk's columns `first .. first + ncols`
        // of each of the `c_out` rows of length `n` lie inside the item's output.
        for (co, &b) in bias.iter().enumerate() {
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * n + first), ncols) };
            row.fill(b);
        }
        let k = d.k(self);
        let rhs: &[f32] = if self.pointwise() {
            &plane[first..]
        } else {
            // Scratch as it was left: im2col writes every element, padding included.
            self.im2col(d, plane, oy, cols);
            cols
        };
        // The patch matrix's row stride: the image's for a pointwise convolution.
        let rhs_rs = if self.pointwise() { n } else { ncols };
        let parallelism = if single {
            gemm_parallelism(2 * d.c_out * ncols * k)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `weight` is `(c_out, k)` and `rhs` holds `k` rows of `ncols` (row stride
        // `rhs_rs`) as checked by the caller's shapes; `dst` as above.
        unsafe {
            gemm::gemm(
                d.c_out,
                ncols,
                k,
                dst.add(first),
                1,
                n as isize,
                true,
                weight.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }

    /// The patch matrix of output rows `oy`: row `(ci · kh + i) · kw + j` holds input pixel
    /// `(oy · s + i − p, ox · s + j − p)` of channel `ci` for each output pixel of the chunk;
    /// padding reads as zero. Every element of `cols` is written.
    fn im2col(&self, d: &Dims, plane: &[f32], oy: std::ops::Range<usize>, cols: &mut [f32]) {
        let (s, p) = (self.stride, self.padding);
        let (h, w, ow) = (d.h, d.w, d.ow);
        let ncols = oy.len() * ow;
        for ci in 0..d.c {
            let channel = &plane[ci * h * w..][..h * w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut cols[((ci * self.kh + i) * self.kw + j) * ncols..][..ncols];
                    // Output columns whose input column ox * s + j - p lies inside the image.
                    let lo = p.saturating_sub(j).div_ceil(s).min(ow);
                    let hi = ((w + p).saturating_sub(j)).div_ceil(s).min(ow).max(lo);
                    for (r, y) in oy.clone().enumerate() {
                        let out = &mut row[r * ow..][..ow];
                        let Some(iy) = (y * s + i).checked_sub(p).filter(|&iy| iy < h) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        let src = &channel[iy * w..][..w];
                        let dst = &mut out[lo..hi];
                        let x0 = lo * s + j - p;
                        if s == 1 {
                            dst.copy_from_slice(&src[x0..x0 + dst.len()]);
                        } else {
                            for (out, x) in dst.iter_mut().zip((x0..).step_by(s)) {
                                *out = src[x];
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::max_diff;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn chunks_of_every_size_match_candle() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cases = [
            (6, 5, 3, 1, 1, 9, 7),
            (6, 5, 3, 2, 1, 9, 8),
            (6, 5, 3, 2, 0, 10, 10),
            (6, 5, 1, 1, 0, 4, 3),
            (4, 3, 3, 1, 0, 5, 6),
            (3, 4, 3, 1, 1, 23, 17),
        ];
        for (i, (c_in, c_out, k, stride, padding, h, w)) in cases.into_iter().enumerate() {
            let cfg = Conv2dConfig {
                stride,
                padding,
                ..Default::default()
            };
            let conv = conv2d(c_in, c_out, k, cfg, vb.pp(format!("conv{i}"))).unwrap();
            let xs = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &Device::Cpu).unwrap();
            let expected = conv.inner.forward(&xs).unwrap();
            // One chunk per output row, a few rows, and the whole image at once.
            for chunk_elems in [1, 3 * c_in * k * k * w, CHUNK_ELEMS] {
                let op = ConvOp {
                    kh: k,
                    kw: k,
                    stride,
                    padding,
                    chunk_elems,
                };
                let ours = xs
                    .apply_op3_no_bwd(&conv.weight_2d, &conv.bias, &op)
                    .unwrap();
                let d = max_diff(&ours, &expected);
                assert!(d < 1e-5, "conv {i}, chunks of {chunk_elems}: {d}");
            }
        }
    }
}
