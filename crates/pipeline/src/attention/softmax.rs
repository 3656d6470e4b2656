//! The online softmax of the tiled attention, in base 2.
//!
//! The queries are multiplied by `scale · log2(e)` before the scores are taken, so that
//! `exp(scale · s) = 2^s'` and each probability costs one `2^x`: a rounding, a degree-6
//! polynomial (Cephes' `exp2f`) and the exponent written into the bits, with no range
//! reduction by `ln 2` and no select (below −127 the result is exactly 0).

use crate::layers::max_of;
use crate::simd::dispatch;

/// Turns one row of scores into unnormalised probabilities against the row's running maximum
/// (only the first `seen` keys count; the others become 0); updates the running maximum and
/// sum, and returns the factor the row's accumulated output must be multiplied by. `fused`:
/// [`fma_native`].
pub(super) fn softmax_row(
    row: &mut [f32],
    seen: usize,
    max: &mut f32,
    sum: &mut f32,
    fused: bool,
) -> f32 {
    if fused {
        row_fused(row, seen, max, sum)
    } else {
        row_plain(row, seen, max, sum)
    }
}

/// Whether multiply-adds are fused natively here: off x86 always; on x86 with FMA (without it
/// `mul_add` would be a library call).
pub(super) fn fma_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

dispatch! {
    fn row_fused(row: &mut [f32], seen: usize, max: &mut f32, sum: &mut f32) -> f32 {
        online::<true>(row, seen, max, sum)
    }
}

dispatch! {
    fn row_plain(row: &mut [f32], seen: usize, max: &mut f32, sum: &mut f32) -> f32 {
        online::<false>(row, seen, max, sum)
    }
}

/// Two passes: the maximum, then the powers with their sum.
#[inline(always)]
fn online<const FMA: bool>(row: &mut [f32], seen: usize, max: &mut f32, sum: &mut f32) -> f32 {
    let (live, hidden) = row.split_at_mut(seen);
    hidden.fill(0.0);
    let new_max = max.max(max_of(live));
    if new_max == f32::NEG_INFINITY {
        live.fill(0.0);
        return 1.0;
    }
    let corr = exp2::<FMA>(*max - new_max);
    let mut acc = [0f32; 16];
    let mut chunks = live.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp2::<FMA>(*x - new_max);
            *a += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2::<FMA>(*x - new_max);
        tail += *x;
    }
    *sum = *sum * corr + acc.iter().sum::<f32>() + tail;
    *max = new_max;
    corr
}

/// `2^x` for `x ≤ 0` (as the softmax needs it) within a few units in the last place; 0 below
/// −127. `FMA`: multiply-adds fused (only where the CPU does them natively).
#[inline(always)]
pub(super) fn exp2<const FMA: bool>(x: f32) -> f32 {
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let x = x.max(-127.0);
    let rounded = x + ROUND;
    let r = x - (rounded - ROUND);
    let mut p = 1.535_336_2e-4;
    p = madd(p, r, 1.339_887_4e-3);
    p = madd(p, r, 9.618_437e-3);
    p = madd(p, r, 5.550_332_5e-2);
    p = madd(p, r, 2.402_264_8e-1);
    p = madd(p, r, 6.931_472e-1);
    let two_r = madd(p, r, 1.0);
    // `rounded`'s low mantissa bits hold n (in −127..=0); n = −127 gives the bits of 0.0.
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    two_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_within_rounding_of_std() {
        for i in 0..=200_000 {
            let x = -130.0 + i as f32 * (130.0 / 200_000.0);
            let exact = (x as f64).exp2();
            for fast in [exp2::<true>(x), exp2::<false>(x)] {
                if x < -127.0 {
                    assert_eq!(fast, 0.0, "{x}");
                } else if x > -126.0 {
                    let rel = ((fast as f64 - exact) / exact).abs();
                    assert!(rel < 3e-7, "2^{x} = {fast}, expected {exact}: {rel:e}");
                }
            }
        }
    }
}
