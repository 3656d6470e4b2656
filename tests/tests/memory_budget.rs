//! The memory budget through the real binary, under an address-space limit as a pod's memory
//! limit imposes one: a request whose working set cannot fit is a 400 naming the budget, the
//! server stays up and the next request is served; without the budget the same request kills
//! the process, which is what the budget is for. A budget set by hand holds requests that fit
//! only one at a time to one at a time.

use std::time::Duration;

use sdserve_tests::*;

/// tiny-sd1 at 384² maps under 400 MB at its peak, at 1024² over 900 MB.
const LIMIT: u64 = 700 * 1024 * 1024;

fn request(size: u32) -> Value {
    prompt_request(
        "a red circle",
        json!({"seed": 1, "num_inference_steps": 1, "height": size, "width": size}),
    )
}

fn error_of(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn under_an_address_space_limit_a_request_that_cannot_fit_is_a_400_and_the_server_lives() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).address_space_limit(LIMIT).start();
    assert!(
        s.log().contains("memory budget on cpu"),
        "the budget is logged at start:\n{}",
        s.log()
    );

    let refused = s.infer("tiny", &request(1024));
    assert_eq!(refused.status, 400, "{}", refused.text());
    let message = error_of(&refused);
    for part in ["height 1024 × width 1024", "memory budget", "memory_budget"] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
    // Alive, and the next request (inside the budget) is served.
    let v = s.infer("tiny", &request(384)).expect(200).json();
    assert_eq!(image_sizes(&v), vec![(384, 384)]);
    s.get("/v2/health/live").expect(200);

    // The failure is counted as an invalid request, not an internal one.
    let m = s.scrape();
    let failures = |reason: &str| {
        m.find(
            "sdserve_request_failures_total",
            &[("model", "tiny"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(failures("invalid"), 1.0);
    assert_eq!(failures("internal"), 0.0);
}

#[test]
fn without_the_budget_the_same_request_kills_the_process() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let mut s = launch(&repo)
        .address_space_limit(LIMIT)
        .args(["--memory-budget", "off"])
        .start();
    let reply = s
        .client()
        .post(s.url("/v2/models/tiny/infer"))
        .json(&request(1024))
        .timeout(Duration::from_secs(120))
        .send();
    assert!(reply.is_err(), "the connection dies with the process");
    wait_until("sdserve to exit", Duration::from_secs(30), || {
        s.exit_status().is_some()
    });
    let status = s.exit_status().expect("exited");
    assert!(!status.success(), "{status:?}");
    assert!(
        s.log().contains("memory allocation of"),
        "an allocation failed:\n{}",
        s.log()
    );
}

#[test]
fn a_budget_set_by_hand_refuses_what_exceeds_it_and_serves_what_fits() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .env("MLSERVER_MEMORY_BUDGET", "200MiB")
        .start();
    let refused = s.infer("tiny", &request(512));
    assert_eq!(refused.status, 400, "{}", refused.text());
    let message = error_of(&refused);
    assert!(message.contains("memory_budget 200.0 MiB"), "{message}");
    s.infer("tiny", &request(256)).expect(200);

    // A bad value names the setting.
    let exit = launch(&repo)
        .env("MLSERVER_MEMORY_BUDGET", "lots")
        .run_to_exit(Duration::from_secs(30));
    assert!(!exit.status.success());
    assert!(
        exit.stderr.contains("MLSERVER_MEMORY_BUDGET=\"lots\""),
        "{}",
        exit.stderr
    );
}
