//! 3×3 convolutions with stride 1 and padding 1 (almost every convolution of the UNet and the
//! VAE) as Winograd's F(2×2, 3×3): each 2×2 block of output pixels is computed from a 4×4 input
//! tile with 16 multiplications per channel pair instead of 36, so the matrix products that
//! dominate the layer do 4 instead of 9 multiply-adds per output pixel and channel pair.
//!
//! With `Bᵀ`, `G` and `Aᵀ` the F(2, 3) matrices (Lavin & Gray), the layer is, per tile,
//! `Y = Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A`. Laid out as 16 planes ξ (the 4×4 positions), the sum
//! over input channels is one matrix product per plane: `M[ξ] = U[ξ] · V[ξ]`, `U[ξ]` the
//! `(c_out, c)` transformed weights and `V[ξ]` the `(c, tiles)` transformed input. The
//! transforms only add, subtract and halve, so the result stays within a few F32 roundings of
//! the direct sum.
//!
//! The weights are transformed at each call (a few percent of the layer's time where this path
//! is taken, see [`applies`]) rather than kept: a second copy of every 3×3 weight would add
//! 16/9 of them to the resident model. Tiles are processed in chunks of whole tile rows whose
//! planes stay within [`CHUNK_ELEMS`](super::CHUNK_ELEMS) floats, in parallel.

use rayon::prelude::*;

use super::CHUNK_ELEMS;
use crate::layers::DisjointOutput as Output;
use crate::layers::gemm_parallelism;
use crate::memory::with_scratch;
use crate::simd::dispatch;

/// Fewest output pixels (over the batch) for which transforming the weights at every call pays:
/// below this the direct convolution is as fast.
const MIN_PIXELS: usize = 1024;

/// Whether a convolution takes this path: 3×3, stride 1, padding 1, wide enough in channels
/// that the products dominate the transforms, and large enough in pixels that the weight
/// transform pays.
pub(super) fn applies(
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
    channels: (usize, usize),
    pixels: usize,
) -> bool {
    kernel == (3, 3)
        && stride == 1
        && padding == 1
        && channels.0 >= 16
        && channels.1 >= 32
        && pixels >= MIN_PIXELS
}

/// The sizes of one layer, in tiles.
#[derive(Clone, Copy)]
struct Tiles {
    c: usize,
    c_out: usize,
    h: usize,
    w: usize,
    /// Tiles per row and per column: `⌈w / 2⌉`, `⌈h / 2⌉`.
    tw: usize,
    th: usize,
}

/// `(batch, c, h, w)` input `x`, `(c_out, c·9)` weight, `(c_out)` bias: the `(batch, c_out, h,
/// w)` output.
pub(super) fn conv(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    conv_in_chunks(x, dims, weight, bias, CHUNK_ELEMS)
}

/// [`conv`] with chunks of at most `chunk_elems` floats per plane set (at least one tile row).
fn conv_in_chunks(
    x: &[f32],
    (batch, c, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
    chunk_elems: usize,
) -> Vec<f32> {
    let c_out = bias.len();
    let t = Tiles {
        c,
        c_out,
        h,
        w,
        tw: w.div_ceil(2),
        th: h.div_ceil(2),
    };
    let u = transform_weights(weight, c, c_out);
    let rows = (chunk_elems / (16 * c.max(c_out) * t.tw)).clamp(1, t.th);
    let chunks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|i| (0..t.th).step_by(rows).map(move |ty| (i, ty)))
        .collect();
    let single = chunks.len() == 1;
    let mut out = vec![0f32; batch * c_out * h * w];
    let dst = Output(out.as_mut_ptr());
    chunks.par_iter().for_each(|&(i, ty0)| {
        let ty = ty0..(ty0 + rows).min(t.th);
        let n = ty.len() * t.tw;
        let plane = &x[i * c * h * w..][..c * h * w];
        let lens = [16 * c * n, 16 * c_out * n, 24 * (t.tw + 1)];
        with_scratch(lens, |[v, m, rows]| {
            let scratch = Scratch { v, m, rows };
            // SAFETY: item `i`'s output starts at `i * c_out * h * w` inside `out`, and
            // this chunk writes only its output rows `2 * ty` (clipped to `h`) of each
            // channel.
            unsafe {
                chunk(
                    &t,
                    plane,
                    &u,
                    bias,
                    ty,
                    scratch,
                    dst.at(i * c_out * h * w),
                    single,
                );
            }
        })
    });
    out
}

/// A chunk's working buffers (from [`with_scratch`]: each is written before it is read).
struct Scratch<'a> {
    /// `V`: 16 planes of `(c, tiles)`.
    v: &'a mut [f32],
    /// `M`: 16 planes of `(c_out, tiles)`.
    m: &'a mut [f32],
    /// One tile row's worth of intermediate vectors for the transforms.
    rows: &'a mut [f32],
}

/// `U`: `(c_out, 16, c)`, so that plane ξ is the `(c_out, c)` matrix with row stride `16 c`.
fn transform_weights(weight: &[f32], c: usize, c_out: usize) -> Vec<f32> {
    let mut u = vec![0f32; c_out * 16 * c];
    u.par_chunks_mut(16 * c)
        .zip(weight.par_chunks(9 * c))
        .for_each(|(u, g)| transform_weight_row(g, u, c));
    u
}

/// One output channel: `G g Gᵀ` of each of its `c` kernels `g`.
fn transform_weight_row(g: &[f32], u: &mut [f32], c: usize) {
    for (ci, g) in g.chunks_exact(9).enumerate() {
        // G g: 4×3, rows (g0, (g0 + g1 + g2) / 2, (g0 − g1 + g2) / 2, g2) of g's rows.
        let mut t = [[0f32; 3]; 4];
        for col in 0..3 {
            let (g0, g1, g2) = (g[col], g[3 + col], g[6 + col]);
            t[0][col] = g0;
            t[1][col] = 0.5 * (g0 + g1 + g2);
            t[2][col] = 0.5 * (g0 - g1 + g2);
            t[3][col] = g2;
        }
        // (G g) Gᵀ: the same combination along each row.
        for (r, t) in t.iter().enumerate() {
            let row = [
                t[0],
                0.5 * (t[0] + t[1] + t[2]),
                0.5 * (t[0] - t[1] + t[2]),
                t[2],
            ];
            for (j, value) in row.into_iter().enumerate() {
                u[(r * 4 + j) * c + ci] = value;
            }
        }
    }
}

/// Tile rows `ty` of one item: input transform, the 16 products, output transform.
///
/// # Safety
/// `dst` is the item's `(c_out, h, w)` output, and no one else writes its rows `2 * ty`.
#[allow(clippy::too_many_arguments)]
unsafe fn chunk(
    t: &Tiles,
    plane: &[f32],
    u: &[f32],
    bias: &[f32],
    ty: std::ops::Range<usize>,
    scratch: Scratch,
    dst: *mut f32,
    single: bool,
) {
    let n = ty.len() * t.tw;
    let Scratch { v, m, rows } = scratch;
    for ci in 0..t.c {
        let channel = &plane[ci * t.h * t.w..][..t.h * t.w];
        for (r, y) in ty.clone().enumerate() {
            transform_input(
                channel,
                t.h,
                t.w,
                t.tw,
                y,
                rows,
                v,
                (ci * n) + r * t.tw,
                t.c * n,
            );
        }
    }
    let parallelism = if single {
        gemm_parallelism(2 * 16 * t.c_out * t.c * n)
    } else {
        gemm::Parallelism::None
    };
    for xi in 0..16 {
        // SAFETY: plane ξ of `U` is `(c_out, c)` at offset `ξ c` with row stride `16 c`
        // inside `u`; plane ξ of `V` is `(c, n)` and of `M` `(c_out, n)`, dense, inside `v`
        // and `m` as sized above.
        unsafe {
            gemm::gemm(
                t.c_out,
                n,
                t.c,
                m.as_mut_ptr().add(xi * t.c_out * n),
                1,
                n as isize,
                false,
                u.as_ptr().add(xi * t.c),
                1,
                (16 * t.c) as isize,
                v.as_ptr().add(xi * t.c * n),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
    for (co, &b) in bias.iter().enumerate() {
        for (r, y) in ty.clone().enumerate() {
            let out_rows = (2 * y..(2 * y + 2).min(t.h)).len();
            // SAFETY: output rows `2y .. 2y + out_rows` of channel `co` lie inside the item's
            // `(c_out, h, w)` output, and only this chunk writes them (see above).
            let out = unsafe {
                std::slice::from_raw_parts_mut(dst.add((co * t.h + 2 * y) * t.w), out_rows * t.w)
            };
            transform_output(m, co * n + r * t.tw, t.c_out * n, t.tw, t.w, b, rows, out);
        }
    }
}

dispatch! {
    /// `Bᵀ d B` for every tile of tile row `y` of one channel, written at `v[offset + ξ·stride
    /// ..][..tw]` for plane ξ. Padding reads as zero.
    #[allow(clippy::too_many_arguments)]
    fn transform_input(
        channel: &[f32],
        h: usize,
        w: usize,
        tw: usize,
        y: usize,
        scratch: &mut [f32],
        v: &mut [f32],
        offset: usize,
        stride: usize,
    ) {
        let len = tw + 1;
        let (parity, scratch) = scratch.split_at_mut(8 * len);
        let (r, _) = scratch.split_at_mut(16 * tw);
        // Input rows 2y − 1 .. 2y + 3, padded by one column each side, split into even and
        // odd padded columns: tile tx reads even[tx], odd[tx], even[tx + 1], odd[tx + 1].
        for row in 0..4 {
            let (even, rest) = parity[2 * row * len..].split_at_mut(len);
            let odd = &mut rest[..len];
            even.fill(0.0);
            odd.fill(0.0);
            let Some(iy) = (2 * y + row).checked_sub(1).filter(|&iy| iy < h) else {
                continue;
            };
            let src = &channel[iy * w..][..w];
            // Padded column x + 1 holds input column x.
            for (x, &value) in src.iter().enumerate() {
                let padded = x + 1;
                if padded % 2 == 0 {
                    even[padded / 2] = value;
                } else {
                    odd[padded / 2] = value;
                }
            }
        }
        // Along each row: (d0 − d2, d1 + d2, d2 − d1, d1 − d3).
        for row in 0..4 {
            let even = &parity[2 * row * len..][..len];
            let odd = &parity[(2 * row + 1) * len..][..len];
            let out = &mut r[4 * row * tw..][..4 * tw];
            let (r0, rest) = out.split_at_mut(tw);
            let (r1, rest) = rest.split_at_mut(tw);
            let (r2, r3) = rest.split_at_mut(tw);
            for tx in 0..tw {
                let (d0, d1, d2, d3) = (even[tx], odd[tx], even[tx + 1], odd[tx + 1]);
                r0[tx] = d0 - d2;
                r1[tx] = d1 + d2;
                r2[tx] = d2 - d1;
                r3[tx] = d1 - d3;
            }
        }
        // Down each column, the same combination of the four rows.
        for j in 0..4 {
            let row = |i: usize| &r[(4 * i + j) * tw..][..tw];
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let terms = [(r0, r2, -1.0), (r1, r2, 1.0), (r2, r1, -1.0), (r1, r3, -1.0)];
            for (i, (a, b, sign)) in terms.into_iter().enumerate() {
                let start = offset + (4 * i + j) * stride;
                combine(&mut v[start..start + tw], a, b, sign);
            }
        }
    }
}

/// `out = a + sign · b`.
#[inline(always)]
fn combine(out: &mut [f32], a: &[f32], b: &[f32], sign: f32) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a + sign * b;
    }
}

dispatch! {
    /// `Aᵀ m A + bias` for every tile of one tile row of one output channel, `m` plane ξ read at
    /// `m[offset + ξ·stride ..][..tw]`, into that tile row's (one or two) output rows `out`.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(
        m: &[f32],
        offset: usize,
        stride: usize,
        tw: usize,
        w: usize,
        bias: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let plane = |xi: usize| &m[offset + xi * stride..][..tw];
        let (s, rest) = scratch.split_at_mut(8 * tw);
        let (y, _) = rest.split_at_mut(4 * tw);
        // Down each column: (m0 + m1 + m2, m1 − m2 − m3).
        for j in 0..4 {
            let (m0, m1, m2, m3) = (plane(j), plane(4 + j), plane(8 + j), plane(12 + j));
            let (s0, s1) = s[2 * j * tw..][..2 * tw].split_at_mut(tw);
            for tx in 0..tw {
                s0[tx] = m0[tx] + m1[tx] + m2[tx];
                s1[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        // Along each row, the same; then interleaved into the output columns 2tx, 2tx + 1.
        for a in 0..2 {
            let col = |j: usize| &s[(2 * j + a) * tw..][..tw];
            let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
            let (y0, y1) = y[2 * a * tw..][..2 * tw].split_at_mut(tw);
            for tx in 0..tw {
                y0[tx] = c0[tx] + c1[tx] + c2[tx] + bias;
                y1[tx] = c1[tx] - c2[tx] - c3[tx] + bias;
            }
            let Some(row) = out.get_mut(a * w..(a + 1) * w) else {
                break;
            };
            for (x, o) in row.iter_mut().enumerate() {
                *o = if x % 2 == 0 { y0[x / 2] } else { y1[x / 2] };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain sum of a 3×3, stride 1, padding 1 convolution, in F64.
    fn direct(
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        g: &[f32],
        bias: &[f32],
    ) -> Vec<f64> {
        let c_out = bias.len();
        let mut out = vec![0f64; b * c_out * h * w];
        for i in 0..b {
            for co in 0..c_out {
                for y in 0..h {
                    for xo in 0..w {
                        let mut acc = bias[co] as f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = ((y + ky) as isize - 1, (xo + kx) as isize - 1);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((i * c + ci) * h + iy as usize) * w + ix as usize];
                                    acc += xv as f64 * g[((co * c + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((i * c_out + co) * h + y) * w + xo] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_direct_sum_at_odd_and_even_sizes() {
        let mut noise = crate::noise::NormalStream::new(7);
        for (b, c, c_out, h, w) in [
            (1, 3, 2, 4, 4),
            (2, 5, 3, 7, 9),
            (1, 16, 8, 1, 1),
            (2, 8, 4, 6, 1),
            (1, 4, 5, 33, 18),
        ] {
            let x = noise.fill(b * c * h * w);
            let g = noise.fill(c_out * c * 9);
            let bias = noise.fill(c_out);
            let expected = direct(&x, (b, c, h, w), &g, &bias);
            // One tile row per chunk, and the whole image at once.
            for chunk_elems in [1, CHUNK_ELEMS] {
                let ours = conv_in_chunks(&x, (b, c, h, w), &g, &bias, chunk_elems);
                let worst = ours
                    .iter()
                    .zip(&expected)
                    .map(|(&o, &e)| (o as f64 - e).abs() / (1.0 + e.abs()))
                    .fold(0f64, f64::max);
                assert!(
                    worst < 1e-5,
                    "{:?}, chunks of {chunk_elems}: {worst}",
                    (b, c, c_out, h, w)
                );
            }
        }
    }
}
