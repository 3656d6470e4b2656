//! A short soak: more concurrent clients than `parallel_workers + max_queue_size` for 20 s,
//! with some clients hanging up and some requests carrying tight deadlines. Every request must
//! be answered with 200, 503 or 504 (none lost, no other status), the server's own counters must
//! account for every request, and no slot may leak.
//!
//! The load generator is the `loadgen` tool's own code (`benches/src/bin/loadgen.rs`).

#[allow(dead_code)]
#[path = "../../benches/src/bin/loadgen.rs"]
mod loadgen;

use std::time::Duration;

use sdserve_tests::*;

const WORKERS: usize = 1;
const QUEUE: usize = 2;
const CLIENTS: usize = 6;
const _: () = assert!(
    CLIENTS > WORKERS + QUEUE,
    "the soak must overflow the slots"
);

#[test]
fn short_soak_loses_no_request_and_leaks_no_slot() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .args([
            "--parallel-workers",
            &WORKERS.to_string(),
            "--max-queue-size",
            &QUEUE.to_string(),
        ])
        .start();

    let mut config = loadgen::Config::new(format!("http://127.0.0.1:{}", s.http_port), "tiny");
    config.concurrency = CLIENTS;
    config.duration = Duration::from_secs(20);
    config.warmup = Duration::from_secs(5);
    config.body = loadgen::default_body("a soaking cat", 2);
    config.pid = Some(s.pid());
    config.client_timeout = CALL_TIMEOUT;
    config.backoff = Duration::from_millis(50);
    config.abandon_every = Some(9);
    config.abandon_after = Duration::from_millis(150);
    config.deadline_every = Some(5);
    config.deadline_ms = 100;
    let report = loadgen::run(&config);
    println!("{}", report.to_text());

    assert_eq!(report.lost, 0, "lost requests: {:?}", report.lost_reasons);
    assert_eq!(report.unexpected(), 0, "statuses {:?}", report.statuses);
    assert!(report.count(200) > 0, "{:?}", report.statuses);
    assert!(
        report.count(503) > 0,
        "{CLIENTS} clients never overflowed {} slots: {:?}",
        WORKERS + QUEUE,
        report.statuses
    );
    assert!(report.rss.before.is_some() && report.rss.end.is_some());

    // The server counted every request: answered ones exactly, abandoned ones as disconnects
    // (or, when the answer beat the hang-up by a hair, as what they became).
    let m = s.scrape_settled();
    let labels = [("model", "tiny"), ("version", "None")];
    let by_reason = |r: &str| {
        m.find(
            "sdserve_request_failures_total",
            &[("model", "tiny"), ("reason", r)],
        )
        .unwrap_or(0.0) as u64
    };
    let success = m.value("model_infer_request_success_total", &labels) as u64;
    let failure = m.value("model_infer_request_failure_total", &labels) as u64;
    // A request abandoned before the server read it may never have reached a handler.
    let counted = success + failure;
    assert!(
        counted <= report.sent && counted + report.abandoned >= report.sent,
        "server counted {counted} of {} sent ({} abandoned): {}",
        report.sent,
        report.abandoned,
        m.dump("sdserve_request_failures_total")
    );
    assert!(success >= report.count(200) && success <= report.count(200) + report.abandoned);
    assert_eq!(by_reason("overloaded"), report.count(503));
    let deadline = by_reason("deadline");
    assert!(deadline >= report.count(504) && deadline <= report.count(504) + report.abandoned);
    assert!(by_reason("disconnected") <= report.abandoned);

    // Nothing is left holding a slot, and the server serves normally.
    wait_until("every slot to be free", Duration::from_secs(10), || {
        let m = s.scrape();
        m.find("sdserve_requests_in_flight", &[]) == Some(0.0)
            && m.find("sdserve_queue_depth", &[]) == Some(0.0)
    });
    s.get("/v2/health/ready").expect(200);
    s.infer(
        "tiny",
        &prompt_request("after the soak", json!({"num_inference_steps": 1})),
    )
    .expect(200);
}
