//! The CPU kernels' inner loops, compiled once more for each vector unit x86-64 CPUs have and
//! picked at run time. The portable build targets baseline x86-64 (SSE2); these loops (exp,
//! erf, normalisation) are written so that the compiler vectorises them, and get 16 lanes on
//! AVX-512 and 8 with FMA on AVX2 instead of 4 without. The matrix products dispatch the same
//! way inside `gemm`.

/// Defines `fn $name` as its body compiled three times (AVX-512, AVX2 + FMA, baseline) and
/// dispatched on the CPU's features (checked once and cached by `std`).
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has every feature `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    dispatch! {
        /// A loop the compiler vectorises.
        fn scaled_sum(xs: &[f32], k: f32) -> f32 {
            xs.iter().map(|x| x * k).sum()
        }
    }

    #[test]
    fn every_version_computes_the_same() {
        let xs: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(scaled_sum(&xs, 0.5), 2475.0);
    }
}
