//! Progress of a request in scheduler steps, as streaming clients see it.
//!
//! A generator reports UNet passes; the two differ only for PNDM (N+1 passes for N steps, more
//! with its Runge-Kutta warm-up). Pass `p` of `P` completes step ⌊p·N/P⌋, so every step is
//! reported once, in order, and the last step at the last pass.

use std::time::Duration;

/// A progress event: `step` of `total` scheduler steps are done.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: usize,
    /// The request's `num_inference_steps`.
    pub total: usize,
    pub elapsed: Duration,
    /// Preview PNGs of the request's images at this step (empty when none was asked for).
    pub preview: Vec<Vec<u8>>,
}

/// Maps passes onto one request's steps.
#[derive(Debug, Clone)]
pub struct StepProgress {
    steps: usize,
    reported: usize,
}

impl StepProgress {
    pub fn new(num_inference_steps: usize) -> Self {
        Self {
            steps: num_inference_steps,
            reported: 0,
        }
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The step pass `done` of `total` completes, if it is one not reported yet.
    pub fn peek(&self, done: usize, total: usize) -> Option<usize> {
        if total == 0 || self.steps == 0 {
            return None;
        }
        let step = (done.min(total) * self.steps) / total;
        (step > self.reported).then_some(step)
    }

    /// As [`StepProgress::peek`], and marks the step reported.
    pub fn advance(&mut self, done: usize, total: usize) -> Option<usize> {
        let step = self.peek(done, total)?;
        self.reported = step;
        Some(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_scheduler_steps() {
        let run = |steps: usize, passes: usize| -> Vec<(usize, usize)> {
            let mut s = StepProgress::new(steps);
            (1..=passes)
                .filter_map(|p| s.advance(p, passes))
                .map(|step| (step, steps))
                .collect()
        };
        assert_eq!(run(3, 3), [(1, 3), (2, 3), (3, 3)]);
        // PNDM without the warm-up: the first step takes two passes.
        assert_eq!(run(3, 4), [(1, 3), (2, 3), (3, 3)]);
        // PNDM's Runge-Kutta warm-up: many passes, still one event per step, the last at the end.
        for (steps, passes) in [(1, 2), (5, 14), (20, 21), (50, 51), (7, 7)] {
            let events = run(steps, passes);
            let expected: Vec<(usize, usize)> = (1..=steps).map(|k| (k, steps)).collect();
            assert_eq!(events, expected, "{steps} steps in {passes} passes");
        }
        assert!(run(0, 3).is_empty());
    }
}
