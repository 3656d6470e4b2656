//! The [`StepControl`] a worker hands the generator for one batch: it stops the batch only
//! when every member has stopped, and reports each member's progress in its own scheduler
//! steps, with previews where the member asked for them.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use sdserve_generation::{GeneratedImage, StepControl, StopReason};

use crate::control::JobControl;
use crate::metrics::Family;
use crate::progress::{Progress, StepProgress};

pub(crate) struct BatchControl<'a> {
    members: &'a [Arc<JobControl>],
    /// Where each member's images start in the merged job, and how many it has.
    images: Vec<(usize, usize)>,
    steps: Vec<StepProgress>,
    previews: Option<Vec<GeneratedImage>>,
    started: Instant,
    last_step: Instant,
    step_seconds: &'a Family,
    model: &'a str,
}

impl<'a> BatchControl<'a> {
    /// `counts`: each member's number of images, in batch order.
    pub(crate) fn new(
        members: &'a [Arc<JobControl>],
        counts: impl IntoIterator<Item = usize>,
        step_seconds: &'a Family,
        model: &'a str,
    ) -> Self {
        let mut offset = 0;
        let images = counts
            .into_iter()
            .map(|n| {
                offset += n;
                (offset - n, n)
            })
            .collect();
        let started = Instant::now();
        Self {
            members,
            images,
            steps: members.iter().map(|m| StepProgress::new(m.steps)).collect(),
            previews: None,
            started,
            last_step: started,
            step_seconds,
            model,
        }
    }

    /// The step a member reaches at pass `done` of `total`, if it wants a preview there
    /// (never at its last step: the result follows at once).
    fn preview_step(&self, member: usize, done: usize, total: usize) -> Option<usize> {
        let m = &self.members[member];
        let every = m.preview_every?;
        if m.stopped().is_some() {
            return None;
        }
        let step = self.steps[member].peek(done, total)?;
        (step < m.steps && step.is_multiple_of(every)).then_some(step)
    }

    /// A member's own images among the batch's previews.
    fn member_previews(&self, member: usize, previews: &[GeneratedImage]) -> Vec<Vec<u8>> {
        let (start, count) = self.images[member];
        previews
            .iter()
            .skip(start)
            .take(count)
            .map(|img| img.png.clone())
            .collect()
    }
}

impl StepControl for BatchControl<'_> {
    fn wants_preview(&self, done: usize, total: usize) -> bool {
        (0..self.members.len()).any(|i| self.preview_step(i, done, total).is_some())
    }

    fn preview(&mut self, images: Vec<GeneratedImage>) {
        self.previews = Some(images);
    }

    fn after_step(&mut self, done: usize, total: usize) -> ControlFlow<StopReason> {
        let now = Instant::now();
        self.step_seconds
            .observe(&[self.model], (now - self.last_step).as_secs_f64());
        self.last_step = now;
        let previews = self.previews.take();
        let mut first_reason = None;
        let mut all_stopped = true;
        for i in 0..self.members.len() {
            if let Some(r) = self.members[i].stopped() {
                first_reason.get_or_insert(r);
                continue;
            }
            all_stopped = false;
            let preview = match (self.preview_step(i, done, total), &previews) {
                (Some(_), Some(images)) => self.member_previews(i, images),
                _ => Vec::new(),
            };
            let Some(step) = self.steps[i].advance(done, total) else {
                continue;
            };
            if let Some(p) = &self.members[i].progress {
                let _ = p.send(Progress {
                    step,
                    total: self.members[i].steps,
                    elapsed: self.started.elapsed(),
                    preview,
                });
            }
        }
        match (all_stopped, first_reason) {
            (true, Some(r)) => ControlFlow::Break(r),
            _ => ControlFlow::Continue(()),
        }
    }
}
