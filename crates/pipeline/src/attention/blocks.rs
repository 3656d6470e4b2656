//! The two block products of the tiled attention, scores `q · kᵀ` and the weighted sum
//! `p · v`, on keys and values packed once per head for all its query blocks: the keys
//! transposed, in blocks of `bk` keys laid one after the other ([`pack_keys`]), the values
//! dense ([`pack_values`]). Each product is one single-threaded `gemm` call: the (item, head,
//! query block) tasks are the parallelism.

/// `kt` = the first `keys` rows of `k` (row stride `rs`, `d` values each) transposed, in
/// blocks of `bk` keys: block `b` is the `(d × bk)` matrix at `b · d · bk`, zero past `keys`.
/// (One transposed matrix for all keys would put the rows a block reads a power of two apart,
/// all in the same cache sets.)
pub(super) fn pack_keys(
    k: &[f32],
    rs: usize,
    (d, keys, bk): (usize, usize, usize),
    kt: &mut [f32],
) {
    kt.fill(0.0);
    // Key by key, so that `k` is read in order.
    for j in 0..keys {
        let block = &mut kt[j / bk * d * bk + j % bk..];
        for (t, &x) in k[j * rs..][..d].iter().enumerate() {
            block[t * bk] = x;
        }
    }
}

/// `vb (keys × dv)` = the first `keys` rows of `v` (row stride `rs`, `dv` values each).
pub(super) fn pack_values(v: &[f32], rs: usize, dv: usize, vb: &mut [f32]) {
    for (j, row) in vb.chunks_exact_mut(dv).enumerate() {
        row.copy_from_slice(&v[j * rs..][..dv]);
    }
}

/// `s (rows × cols) = q (rows × d, row stride q_rs) · kt (d × cols, row stride kt_rs)`.
pub(super) fn scores(
    (q, q_rs): (&[f32], usize),
    (d, rows, cols): (usize, usize, usize),
    (kt, kt_rs): (&[f32], usize),
    s: &mut [f32],
) {
    product(rows, cols, d, s, (q, q_rs), (kt, kt_rs), false);
}

/// `acc (rows × dv) += p (rows × cols) · vb (cols × dv)`.
pub(super) fn accumulate_values(
    p: &[f32],
    (rows, cols): (usize, usize),
    vb: &[f32],
    dv: usize,
    acc: &mut [f32],
) {
    product(rows, dv, cols, acc, (p, cols), (vb, dv), true);
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or `dst +=` with `accumulate`; row-major
/// operands with the given row strides. Single-threaded: the tasks are the parallelism.
fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (lhs, lhs_rs): (&[f32], usize),
    (rhs, rhs_rs): (&[f32], usize),
    accumulate: bool,
) {
    let last = |rs: usize, rows: usize, cols: usize| {
        (rows.saturating_sub(1)) * rs + cols.saturating_sub(1)
    };
    assert!(
        dst.len() >= m * n
            && (m * k == 0 || last(lhs_rs, m, k) < lhs.len())
            && (k * n == 0 || last(rhs_rs, k, n) < rhs.len()),
        "attention block product out of its buffers"
    );
    if m * n * k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertion above keeps every element the views address inside `lhs`, `rhs`
    // and `dst`; `dst` is row-major m x n and only written through `dst`.
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
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
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
