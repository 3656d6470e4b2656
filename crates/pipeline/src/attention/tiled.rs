//! Attention on the CPU in F32 without the score matrix: queries in blocks of [`BLOCK_Q`] rows,
//! keys and values streamed in blocks sized to stay in cache, with an online softmax (a running
//! maximum and sum per query row, the accumulated output rescaled when the maximum grows).
//! Memory is `O(block)` per task instead of `O(q_len × k_len)`, the block products are register-blocked
//! kernels ([`blocks`](super::blocks)), and the (item, head, query block) tasks run in parallel.
//!
//! Heads are read in place from `(B, S, H · D)` operands (head `h` is columns
//! `h·D .. (h+1)·D` of every row) and written in place to a `(B, Sq, H · Dv)` output, so no
//! head is ever copied out.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::blocks;
use super::softmax::{fma_native, softmax_row};
use crate::layers::{DisjointOutput as Output, f32_slice};
use crate::memory::with_scratch;

/// Query rows per task.
pub const BLOCK_Q: usize = 64;

/// Keys per block: a key block of about 512 KiB (it stays in L2 while every query row of the
/// block reads it), between 64 and 512 keys.
fn block_k(dim: usize) -> usize {
    let keys = 128 * 1024 / dim.max(1);
    (keys.clamp(64, 512) / 16) * 16
}

/// `softmax(q kᵀ · scale) v` for each of `heads` heads of `(B, Sq, H·D)` / `(B, Sk, H·D)` /
/// `(B, Sk, H·Dv)` contiguous F32 operands; `causal`: query `i` sees keys `0..=i` only
/// (`Sq == Sk`).
pub struct Tiled {
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
}

/// One head's operands: `q` rows `q_rs` floats apart, the keys packed transposed in blocks of
/// `bk` and the values packed (`sk × dv`), see [`blocks`].
struct Head<'a> {
    q: &'a [f32],
    q_rs: usize,
    /// Keys per block; the packed keys are `(d × bk)` blocks one after the other.
    bk: usize,
    kt: &'a [f32],
    vb: &'a [f32],
    sk: usize,
    d: usize,
    dv: usize,
}

impl CustomOp3 for Tiled {
    fn name(&self) -> &'static str {
        "attention-tiled"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_slice(q, q_l, "attention q")?,
            f32_slice(k, k_l, "attention k")?,
            f32_slice(v, v_l, "attention v")?,
        );
        let (b, sq, qd) = q_l.shape().dims3()?;
        let (bk, sk, kd) = k_l.shape().dims3()?;
        let (bv, skv, vd) = v_l.shape().dims3()?;
        let h = self.heads.max(1);
        let fits = bk == b && bv == b && kd == qd && skv == sk && qd % h == 0 && vd % h == 0;
        if !fits || (self.causal && sq != sk) {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together in {h} heads",
                q_l.dims(),
                k_l.dims(),
                v_l.dims()
            )
        }
        let (d, dv) = (qd / h, vd / h);
        let mut out = vec![0f32; b * sq * vd];
        if sq == 0 || dv == 0 || sk == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, sq, vd))));
        }
        // Every query block of a head reads all its keys and values: packed once per head.
        let bk = block_k(d.max(dv));
        let kt_len = sk.div_ceil(bk) * d * bk;
        let mut kt = vec![0f32; b * h * kt_len];
        let mut vb = vec![0f32; b * h * sk * dv];
        kt.par_chunks_mut(kt_len)
            .zip(vb.par_chunks_mut(sk * dv))
            .enumerate()
            .for_each(|(task, (kt, vb))| {
                let (item, head) = (task / h, task % h);
                blocks::pack_keys(&k[item * sk * qd + head * d..], qd, (d, sk, bk), kt);
                let v = &v[item * sk * vd + head * dv..];
                blocks::pack_values(v, vd, dv, vb);
            });
        let q_blocks = sq.div_ceil(BLOCK_Q);
        let dst = Output(out.as_mut_ptr());
        (0..b * h * q_blocks).into_par_iter().for_each(|task| {
            let (item, head, block) = (task / (h * q_blocks), task / q_blocks % h, task % q_blocks);
            let packed = item * h + head;
            let view = Head {
                q: &q[item * sq * qd + head * d..],
                q_rs: qd,
                bk,
                kt: &kt[packed * kt_len..][..kt_len],
                vb: &vb[packed * sk * dv..][..sk * dv],
                sk,
                d,
                dv,
            };
            let q0 = block * BLOCK_Q;
            let rows = BLOCK_Q.min(sq - q0);
            // SAFETY: this task alone writes rows `q0 .. q0 + rows`, columns
            // `head·dv .. (head+1)·dv`, of item `item`'s output.
            unsafe {
                let out = dst.at(item * sq * vd + q0 * vd + head * dv);
                self.query_block(&view, q0, rows, out, vd);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, sq, vd))))
    }
}

impl Tiled {
    /// Rows `q0 .. q0 + rows` of one head, written to `out` (row stride `out_rs`).
    ///
    /// # Safety
    /// `out` addresses `rows` rows of `h.dv` floats, `out_rs` apart, that no one else writes.
    unsafe fn query_block(&self, h: &Head, q0: usize, rows: usize, out: *mut f32, out_rs: usize) {
        let q = &h.q[q0 * h.q_rs..];
        // The last key the block's last row sees, plus one.
        let k_end = if self.causal {
            (q0 + rows).min(h.sk)
        } else {
            h.sk
        };
        let (bk, dv) = (h.bk, h.dv);
        let fused = fma_native();
        // The block's queries times scale · log2(e), for the softmax in base 2.
        let factor = self.scale * std::f32::consts::LOG2_E;
        // Every buffer is written before it is read: the queries and scores in full, the
        // running maxima, sums and output rows reset here.
        let lens = [rows * h.d, rows, rows, rows * bk.min(k_end), rows * dv];
        with_scratch(lens, |[qs, max, sum, scores, acc]| {
            for (r, row) in qs.chunks_exact_mut(h.d).enumerate() {
                for (x, &y) in row.iter_mut().zip(&q[r * h.q_rs..][..h.d]) {
                    *x = y * factor;
                }
            }
            max.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            // The block's output rows, accumulated here and written out at the end.
            acc.fill(0.0);
            for k0 in (0..k_end).step_by(bk) {
                let cols = bk.min(k_end - k0);
                let s = &mut scores[..rows * cols];
                let kt = &h.kt[k0 / bk * h.d * bk..];
                blocks::scores((qs, h.d), (h.d, rows, cols), (kt, bk), s);
                for (r, row) in s.chunks_exact_mut(cols).enumerate() {
                    let seen = if self.causal {
                        (q0 + r + 1).saturating_sub(k0).min(cols)
                    } else {
                        cols
                    };
                    let corr = softmax_row(row, seen, &mut max[r], &mut sum[r], fused);
                    if corr != 1.0 {
                        for o in &mut acc[r * dv..][..dv] {
                            *o *= corr;
                        }
                    }
                }
                let vb = &h.vb[k0 * dv..][..cols * dv];
                blocks::accumulate_values(s, (rows, cols), vb, dv, acc);
            }
            for (r, o) in acc.chunks_exact(dv).enumerate() {
                let inv = 1.0 / sum[r];
                // SAFETY: row `r` of the block's output, as the caller promises.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.add(r * out_rs), h.dv) };
                for (d, x) in dst.iter_mut().zip(o) {
                    *d = x * inv;
                }
            }
        })
    }
}
