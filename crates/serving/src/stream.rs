//! The streaming loop both transports run: progress events go out in order while the request
//! runs, then the result; a client that goes away cancels the generation.

use sdserve_engine::Progress;
use tokio::sync::mpsc;

use crate::error::ServeError;
use crate::infer::Accepted;
use crate::response::Generated;

/// Runs `accepted`, sending `event(progress)` on `events` for every step. `None`: the client
/// went away (the receiver was dropped), and the generation was cancelled.
pub async fn run_streaming<M>(
    accepted: Accepted,
    events: &mpsc::Sender<M>,
    event: impl Fn(&Progress) -> M,
) -> Option<Result<Generated, ServeError>> {
    let (progress, mut steps) = mpsc::unbounded_channel::<Progress>();
    let result = {
        let run = accepted.run(Some(progress));
        tokio::pin!(run);
        loop {
            tokio::select! {
                biased;
                Some(p) = steps.recv() => {
                    if events.send(event(&p)).await.is_err() {
                        break None;
                    }
                }
                r = &mut run => break Some(r),
                _ = events.closed() => break None,
            }
        }
    }?;
    // Progress reported just before the end still goes out, in order, before the result.
    while let Ok(p) = steps.try_recv() {
        if events.send(event(&p)).await.is_err() {
            break;
        }
    }
    Some(result)
}
