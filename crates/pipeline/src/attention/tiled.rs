//! Attention on the CPU in F32 without the score matrix: queries in blocks of [`BLOCK_Q`] rows,
//! keys and values streamed in blocks sized to stay in cache, with an online softmax (a running
//! maximum and sum per query row, the accumulated output rescaled when the maximum grows).
//! Memory is `O(block)` per task instead of `O(q_len × k_len)`, every block product is one
//! `gemm` call, and the (head, query block) tasks run in parallel.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};
use rayon::prelude::*;

use crate::layers::{exp, f32_slice, max_of, sum_of};

/// Query rows per task.
pub const BLOCK_Q: usize = 64;

/// Keys per block: a key and a value block together about 256 KiB, between 64 and 512 keys.
fn block_k(dim: usize) -> usize {
    let keys = 32 * 1024 / dim.max(1);
    (keys.clamp(64, 512) / 16) * 16
}

/// `softmax(q kᵀ · scale) v` over `(N, Sq, D)` / `(N, Sk, D)` / `(N, Sk, Dv)` contiguous F32
/// operands; `causal`: query `i` sees keys `0..=i` only (`Sq == Sk`).
pub struct Tiled {
    pub scale: f32,
    pub causal: bool,
}

/// One head's operands, and the sizes they share.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
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
        let (n, sq, d) = q_l.shape().dims3()?;
        let (nk, sk, dk) = k_l.shape().dims3()?;
        let (nv, skv, dv) = v_l.shape().dims3()?;
        if nk != n || nv != n || dk != d || skv != sk || (self.causal && sq != sk) {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q_l.dims(),
                k_l.dims(),
                v_l.dims()
            )
        }
        let mut out = vec![0f32; n * sq * dv];
        if sq == 0 || dv == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((n, sq, dv))));
        }
        out.par_chunks_mut(sq * dv)
            .enumerate()
            .for_each(|(h, out)| {
                let head = Head {
                    q: &q[h * sq * d..][..sq * d],
                    k: &k[h * sk * d..][..sk * d],
                    v: &v[h * sk * dv..][..sk * dv],
                    sk,
                    d,
                    dv,
                };
                out.par_chunks_mut(BLOCK_Q * dv)
                    .enumerate()
                    .for_each(|(b, out)| self.query_block(&head, b * BLOCK_Q, out));
            });
        Ok((CpuStorage::F32(out), Shape::from((n, sq, dv))))
    }
}

impl Tiled {
    /// Rows `q0..q0 + out.len() / dv` of one head, written to `out`.
    fn query_block(&self, h: &Head, q0: usize, out: &mut [f32]) {
        let rows = out.len() / h.dv;
        if h.sk == 0 {
            return;
        }
        let q = &h.q[q0 * h.d..][..rows * h.d];
        // The last key the block's last row sees, plus one.
        let k_end = if self.causal {
            (q0 + rows).min(h.sk)
        } else {
            h.sk
        };
        let bk = block_k(h.d.max(h.dv));
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut scores = vec![0f32; rows * bk.min(k_end)];
        for k0 in (0..k_end).step_by(bk) {
            let cols = bk.min(k_end - k0);
            let s = &mut scores[..rows * cols];
            // s = q · k[k0..k0 + cols]ᵀ: the key block read as a (d × cols) matrix.
            product(
                rows,
                cols,
                h.d,
                s,
                (q, h.d, 1),
                (&h.k[k0 * h.d..], 1, h.d),
                false,
            );
            for (r, row) in s.chunks_exact_mut(cols).enumerate() {
                let seen = if self.causal {
                    (q0 + r + 1).saturating_sub(k0).min(cols)
                } else {
                    cols
                };
                let corr = self.softmax_row(row, seen, &mut max[r], &mut sum[r]);
                if corr != 1.0 {
                    for o in &mut out[r * h.dv..][..h.dv] {
                        *o *= corr;
                    }
                }
            }
            // out += p · v[k0..k0 + cols]
            let v = &h.v[k0 * h.dv..];
            product(rows, h.dv, cols, out, (s, cols, 1), (v, h.dv, 1), true);
        }
        for (r, o) in out.chunks_exact_mut(h.dv).enumerate() {
            let inv = 1.0 / sum[r];
            for x in o {
                *x *= inv;
            }
        }
    }

    /// Turns one row of raw scores into unnormalised probabilities against the row's running
    /// maximum (only the first `seen` keys count); updates the running maximum and sum and
    /// returns the factor the row's accumulated output must be multiplied by.
    fn softmax_row(&self, row: &mut [f32], seen: usize, max: &mut f32, sum: &mut f32) -> f32 {
        let (live, hidden) = row.split_at_mut(seen);
        hidden.fill(0.0);
        for x in live.iter_mut() {
            *x *= self.scale;
        }
        let new_max = max.max(max_of(live));
        if new_max == f32::NEG_INFINITY {
            live.fill(0.0);
            return 1.0;
        }
        let corr = exp(*max - new_max);
        for x in live.iter_mut() {
            *x = exp(*x - new_max);
        }
        *sum = *sum * corr + sum_of(live, |x| x);
        *max = new_max;
        corr
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or `dst +=` with `accumulate`; each operand as
/// `(data, row stride, column stride)`. Single-threaded: the tasks are the parallelism.
fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    accumulate: bool,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        (rows.saturating_sub(1)) * rs + (cols.saturating_sub(1)) * cs
    };
    assert!(
        dst.len() >= m * n
            && (m * k == 0 || last(lhs_rs, lhs_cs, m, k) < lhs.len())
            && (k * n == 0 || last(rhs_rs, rhs_cs, k, n) < rhs.len()),
        "attention block product out of its buffers"
    );
    if m * n * k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertion above keeps every element the strided views address inside
    // `lhs`, `rhs` and `dst`; `dst` is row-major m x n and only written through `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
