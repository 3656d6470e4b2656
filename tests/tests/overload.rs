//! Admission control: with one worker and `max_queue_size=1`, a burst of concurrent requests
//! gets quick 503s with `Retry-After` for what does not fit, 200s for the rest, and the
//! failures are counted exactly.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use sdserve_tests::*;

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "1"])
        .start();
    // Long enough (about 2 s on a CPU) that the burst arrives while the first runs.
    let body = prompt_request("a crowded cat", json!({"num_inference_steps": 60}));

    let burst = 5;
    let barrier = Barrier::new(burst);
    let replies: Vec<(Reply, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..burst)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    let t = Instant::now();
                    let r = s.infer("tiny", &body);
                    (r, t.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });

    let fastest_ok = replies
        .iter()
        .filter(|(r, _)| r.status == 200)
        .map(|(_, t)| *t)
        .min()
        .expect("some request succeeded");
    let (mut ok, mut refused) = (0, 0);
    for (r, took) in &replies {
        match r.status {
            200 => {
                ok += 1;
                assert_eq!(image_sizes(&r.json()), vec![(64, 64)]);
            }
            503 => {
                refused += 1;
                let retry = r.header("retry-after").expect("a 503 carries Retry-After");
                assert!(
                    retry.parse::<u64>().is_ok_and(|n| n >= 1),
                    "Retry-After {retry:?}"
                );
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/json")
                );
                let e = r.error();
                assert!(e.contains("overloaded"), "{e}");
                // Refused at once, not after waiting for a slot (which takes a generation).
                assert!(
                    *took < fastest_ok / 2,
                    "a 503 took {took:?}, a generation {fastest_ok:?}"
                );
            }
            other => panic!("unexpected status {other}: {}", r.text()),
        }
    }
    // One worker plus one queue slot: the first two always fit; the burst overflows.
    assert!(ok >= 2, "{ok} succeeded");
    assert!(refused >= 1, "no request was refused ({ok} succeeded)");
    assert_eq!(ok + refused, burst);

    let m = s.scrape_settled();
    let labels = [("model", "tiny"), ("version", "None")];
    assert_eq!(
        m.value("model_infer_request_failure_total", &labels),
        refused as f64
    );
    assert_eq!(
        m.value("model_infer_request_success_total", &labels),
        ok as f64
    );
    assert_eq!(
        m.value("model_infer_request_duration_count", &labels),
        burst as f64
    );
    assert_eq!(
        m.value(
            "sdserve_request_failures_total",
            &[("model", "tiny"), ("reason", "overloaded")]
        ),
        refused as f64
    );
    let rest = |status| {
        m.value(
            "rest_server_requests_total",
            &[
                ("method", "POST"),
                ("path", "/v2/models/{model_name}/infer"),
                ("status_code", status),
            ],
        )
    };
    assert_eq!(rest("503"), refused as f64);
    assert_eq!(rest("200"), ok as f64);
    assert_eq!(
        m.value("parallel_request_queue_count", &[]),
        ok as f64,
        "refused requests never entered the queue"
    );
    assert_eq!(m.value("sdserve_requests_in_flight", &[]), 0.0);

    // The slots were given back: the server takes requests again.
    let r = s.infer(
        "tiny",
        &prompt_request("after the burst", json!({"num_inference_steps": 1})),
    );
    r.expect(200);
}
