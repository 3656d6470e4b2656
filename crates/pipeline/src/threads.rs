//! How candle's CPU threads wait, for the pipeline's sake.
//!
//! candle runs its elementwise ops on a barrier pool of its own (`CANDLE_NUM_THREADS` − 1
//! workers) whose workers spin 25,000 times after each op before they park, while the
//! pipeline's own kernels (convolutions, attention, normalisation) run on rayon's pool. With
//! as many threads as cores, a barrier worker still spinning takes a core from the rayon workers
//! of the kernel that follows. On the 2-core development machine the UNet pass of the default
//! model at 128² took 0.163 s with candle's limit and 0.09–0.11 s with limits of 1 to 200
//! (`time_generation --stages`, medians of 7); 64² and 256² did not change beyond the noise.

/// The spin limit set when the user has not chosen one.
const SPIN_LIMIT: &str = "100";

/// candle's variable for its barrier workers' spin limit.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Sets candle's barrier-pool spin limit to [`SPIN_LIMIT`] unless the environment sets it.
///
/// # Safety
/// Changes the environment: call it at start, before any other thread runs (candle reads the
/// variable when its pool starts, at the first elementwise op).
pub unsafe fn limit_idle_spinning() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: no other thread runs yet, as the caller promises.
        unsafe { std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT) };
    }
}
