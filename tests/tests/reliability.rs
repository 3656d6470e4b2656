//! Reliability of the real server: deadlines in both phases, client disconnects, graceful drain
//! on SIGTERM, configurable limits, bearer-token auth and repository path safety.
//!
//! Timing tests calibrate the tiny model's step time first and size their long requests to last
//! seconds, so that "well before the cancelled request would have finished" is measured, not
//! assumed, whatever the machine's speed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use sdserve_tests::*;

const LABELS: [(&str, &str); 2] = [("model", "tiny"), ("version", "None")];

/// A repository with one model, `tiny`, whose step limit allows long requests.
fn repo_with(limits: Value) -> Repo {
    let repo = Repo::new();
    let mut settings = tiny_settings("tiny", None);
    settings["parameters"]["extra"]["limits"] = limits;
    repo.model("tiny", settings);
    repo
}

fn long_repo() -> Repo {
    repo_with(json!({"max_num_inference_steps": 100000}))
}

/// How long the tiny model's denoising steps take on this machine right now, at an image size
/// where 1000 steps (the scheduler's training steps, the most a request may ask for) last at
/// least 30 s, so that any request duration the tests need is reachable.
struct Speed {
    size: u64,
    per_step: f64,
    /// Requests the calibration made (all succeed).
    requests: usize,
}

fn calibrate(s: &Server) -> Speed {
    s.infer(
        "tiny",
        &prompt_request("warm up", json!({"num_inference_steps": 1})),
    )
    .expect(200);
    let steps = 10;
    let mut speed = Speed {
        size: 64,
        per_step: 0.0,
        requests: 1,
    };
    for size in [64, 128, 256, 512] {
        let r = s
            .infer(
                "tiny",
                &prompt_request(
                    "calibrate",
                    json!({"num_inference_steps": steps, "height": size, "width": size}),
                ),
            )
            .expect(200)
            .json();
        let seconds = r["parameters"]["generation_seconds"]
            .as_f64()
            .expect("generation_seconds");
        speed = Speed {
            size,
            per_step: (seconds / steps as f64).max(0.001),
            requests: speed.requests + 1,
        };
        // The next size costs about four times as much: a calibration request stays near a
        // second, so the whole calibration is short even on a loaded machine.
        if speed.per_step * 1000.0 >= 30.0 || seconds * 4.0 > 1.0 {
            break;
        }
    }
    println!(
        "calibration: {:.1} ms per step at {}×{}",
        speed.per_step * 1000.0,
        speed.size,
        speed.size
    );
    speed
}

impl Speed {
    /// Steps that make a generation last about `seconds`.
    fn steps(&self, seconds: f64) -> u64 {
        ((seconds / self.per_step).ceil() as u64).clamp(20, 1000)
    }

    /// Request parameters for `steps` steps at the calibrated size, plus `extra`.
    fn params(&self, steps: u64, extra: Value) -> Value {
        let mut p = json!({"num_inference_steps": steps, "height": self.size, "width": self.size});
        for (k, v) in extra.as_object().expect("an object") {
            p[k] = v.clone();
        }
        p
    }
}

fn gauge(s: &Server, name: &str) -> f64 {
    s.scrape().find(name, &[]).unwrap_or(0.0)
}

fn failures(m: &Metrics, reason: &str) -> f64 {
    m.find(
        "sdserve_request_failures_total",
        &[("model", "tiny"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

fn steps_run(s: &Server) -> f64 {
    s.scrape()
        .find("sdserve_denoise_step_seconds_count", &[("model", "tiny")])
        .unwrap_or(0.0)
}

// ---- raw HTTP ---------------------------------------------------------------------------------

/// Opens a connection and writes one request by hand: for paths an HTTP library would
/// normalise, and for sockets the test closes mid-request.
fn raw_send(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", s.http_port)).expect("connecting");
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .expect("read timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("writing the head");
    stream.write_all(body).expect("writing the body");
    stream
}

/// Reads a whole `Connection: close` answer: status and (de-chunked) body.
fn raw_read(mut stream: TcpStream) -> (u16, Vec<u8>) {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).expect("reading the answer");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut body = all[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

fn raw_post_json(s: &Server, path: &str, body: &Value) -> TcpStream {
    raw_send(
        s,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The `error` string of a JSON error body.
fn error_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error string in {v}"))
        .to_owned()
}

// ---- deadlines ----------------------------------------------------------------------------------

#[test]
fn deadline_while_queued_answers_504_and_frees_the_queue_slot() {
    let repo = long_repo();
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "1"])
        .start();
    let speed = calibrate(&s);
    let long_steps = speed.steps(6.0);

    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            s.infer(
                "tiny",
                &prompt_request("long", speed.params(long_steps, json!({}))),
            )
        });
        wait_until("the long request to run", START_TIMEOUT, || {
            gauge(&s, "sdserve_requests_running") == 1.0
        });

        // Queued behind the long one, with a 300 ms deadline.
        let t = Instant::now();
        let r = s.infer(
            "tiny",
            &prompt_request("impatient", json!({"timeout": 300})),
        );
        let took = t.elapsed();
        r.expect(504);
        let e = r.error();
        assert!(
            e.contains("300 ms") && e.contains("waiting in the queue"),
            "{e}"
        );
        assert!(took < Duration::from_secs(3), "the 504 took {took:?}");
        println!("queued deadline: 504 after {took:?}");

        // The only queue slot is free again: this one is queued, not refused with 503.
        let after = s.infer("tiny", &prompt_request("next in line", json!({})));
        after.expect(200);
        long.join().unwrap().expect(200);
    });

    let m = s.scrape_settled();
    assert_eq!(failures(&m, "deadline"), 1.0);
    assert_eq!(m.value("model_infer_request_failure_total", &LABELS), 1.0);
    // warm-up and calibration, the long one, the one after.
    assert_eq!(
        m.value("model_infer_request_success_total", &LABELS),
        speed.requests as f64 + 2.0
    );
    assert_eq!(
        m.value(
            "rest_server_requests_total",
            &[
                ("method", "POST"),
                ("path", "/v2/models/{model_name}/infer"),
                ("status_code", "504")
            ]
        ),
        1.0
    );
    assert_eq!(m.value("sdserve_requests_in_flight", &[]), 0.0);
}

#[test]
fn deadline_while_generating_answers_504_and_the_worker_moves_on() {
    let repo = long_repo();
    // Calibrated on a server without a deadline: on a loaded machine even a short calibration
    // request could outlast the 2 s one this test sets.
    let speed = calibrate(&launch(&repo).start());
    // The server-wide deadline (2 s) and the per-request one: the shorter one wins.
    let s = launch(&repo)
        .args([
            "--parallel-workers",
            "1",
            "--max-queue-size",
            "2",
            "--request-timeout",
            "2",
        ])
        .start();
    let per_step = speed.per_step;
    let long_steps = speed.steps(8.0);
    let expected_long = long_steps as f64 * per_step;
    let steps_before = steps_run(&s);

    let t = Instant::now();
    let r = s.infer(
        "tiny",
        &prompt_request(
            "too slow",
            speed.params(long_steps, json!({"timeout": 1000})),
        ),
    );
    let took = t.elapsed();
    r.expect(504);
    let e = r.error();
    assert!(e.contains("1000 ms") && e.contains("generating"), "{e}");
    assert!(
        took.as_secs_f64() < 1.0 + expected_long / 3.0,
        "the 504 took {took:?}; the whole generation would take {expected_long:.1} s"
    );

    // The worker stops at its next step: the next request starts at once.
    let t = Instant::now();
    let next = s
        .infer(
            "tiny",
            &prompt_request("next", json!({"num_inference_steps": 1})),
        )
        .expect(200)
        .json();
    let next_took = t.elapsed();
    let queued = next["parameters"]["queue_seconds"].as_f64().unwrap();
    println!(
        "generating deadline: 504 after {took:?}; next request took {next_took:?} (queued {queued} s); \
         the cancelled one would have run {expected_long:.1} s"
    );
    assert!(
        next_took.as_secs_f64() < expected_long / 4.0,
        "the next request took {next_took:?}"
    );
    // Steps of the cancelled request: about a second's worth, far from all of them.
    let ran = steps_run(&s) - steps_before - 1.0;
    assert!(
        ran < long_steps as f64 / 2.0,
        "{ran} of {long_steps} steps ran"
    );

    // The server-wide deadline applies to a request that sets none.
    let t = Instant::now();
    let r = s.infer(
        "tiny",
        &prompt_request(
            "no deadline of its own",
            speed.params(long_steps, json!({})),
        ),
    );
    r.expect(504);
    assert!(r.error().contains("2000 ms"), "{}", r.error());
    assert!(t.elapsed() < Duration::from_secs_f64(2.0 + expected_long / 3.0));

    let m = s.scrape_settled();
    assert_eq!(failures(&m, "deadline"), 2.0);
    assert_eq!(m.value("model_infer_request_failure_total", &LABELS), 2.0);
    // The 504 leaves at the deadline; the worker lets go of the slot at its next step.
    wait_until(
        "the slot of the request past its deadline to be freed",
        Duration::from_secs_f64(2.0 + 5.0 * per_step),
        || gauge(&s, "sdserve_requests_in_flight") == 0.0,
    );
}

// ---- client disconnect --------------------------------------------------------------------------

#[test]
fn client_disconnect_cancels_queued_and_running_requests() {
    let repo = long_repo();
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "3"])
        .start();
    let speed = calibrate(&s);
    let per_step = speed.per_step;
    let long_steps = speed.steps(8.0);
    let expected_long = long_steps as f64 * per_step;
    let steps_before = steps_run(&s);
    let long = prompt_request("abandoned", speed.params(long_steps, json!({})));
    let path = "/v2/models/tiny/infer";

    let running = raw_post_json(&s, path, &long);
    wait_until("the first request to run", START_TIMEOUT, || {
        gauge(&s, "sdserve_requests_running") == 1.0
    });
    let started = Instant::now();

    // A queued request whose client leaves: it leaves the queue.
    let queued = raw_post_json(&s, path, &long);
    wait_until("the second request to queue", START_TIMEOUT, || {
        gauge(&s, "sdserve_queue_depth") == 1.0
    });
    queued.shutdown(Shutdown::Both).expect("closing");
    drop(queued);
    wait_until(
        "the abandoned queued request to leave",
        START_TIMEOUT,
        || gauge(&s, "sdserve_queue_depth") == 0.0,
    );
    assert_eq!(gauge(&s, "sdserve_requests_in_flight"), 1.0);

    std::thread::scope(|scope| {
        let next = scope.spawn(|| {
            s.infer(
                "tiny",
                &prompt_request("next", json!({"num_inference_steps": 1})),
            )
        });
        wait_until("the next request to queue", START_TIMEOUT, || {
            gauge(&s, "sdserve_queue_depth") == 1.0
        });
        // The running request's client leaves.
        let closed_at = Instant::now();
        let remaining = expected_long - started.elapsed().as_secs_f64();
        running.shutdown(Shutdown::Both).expect("closing");
        drop(running);
        let r = next.join().unwrap();
        let waited = closed_at.elapsed();
        r.expect(200);
        println!(
            "disconnect: the next request finished {waited:?} after the client left; the \
             cancelled one had about {remaining:.1} s to go ({per_step:.3} s per step)"
        );
        assert!(
            waited.as_secs_f64() < remaining / 3.0,
            "the next request took {waited:?} after the disconnect; the cancelled one had \
             {remaining:.1} s left"
        );
    });

    let ran = steps_run(&s) - steps_before - 1.0;
    assert!(
        ran < long_steps as f64 / 2.0,
        "{ran} of {long_steps} steps of the cancelled request ran"
    );
    let m = s.scrape_settled();
    assert_eq!(
        failures(&m, "disconnected"),
        2.0,
        "{}",
        m.dump("sdserve_request_failures_total")
    );
    assert_eq!(m.value("model_infer_request_failure_total", &LABELS), 2.0);
    assert_eq!(m.value("sdserve_requests_in_flight", &[]), 0.0);
    assert_eq!(m.value("sdserve_requests_running", &[]), 0.0);
}

#[test]
fn closing_an_event_stream_cancels_its_generation() {
    let repo = long_repo();
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "2"])
        .start();
    let speed = calibrate(&s);
    let per_step = speed.per_step;
    let long_steps = speed.steps(8.0);
    let steps_before = steps_run(&s);

    let mut stream = raw_post_json(
        &s,
        "/v2/models/tiny/infer_stream",
        &prompt_request("streamed", speed.params(long_steps, json!({}))),
    );
    // Read until the first progress event has arrived, then leave.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"progress\"") {
        let n = stream.read(&mut buf).expect("reading the stream");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(stream);
    let t = Instant::now();
    s.infer(
        "tiny",
        &prompt_request("after the stream", json!({"num_inference_steps": 1})),
    )
    .expect(200);
    let waited = t.elapsed();
    let expected = long_steps as f64 * per_step;
    println!("stream disconnect: next request after {waited:?} (stream would run {expected:.1} s)");
    assert!(waited.as_secs_f64() < expected / 3.0, "{waited:?}");
    assert!(steps_run(&s) - steps_before < long_steps as f64 / 2.0);
    wait_until("the failure to be counted", Duration::from_secs(10), || {
        failures(&s.scrape(), "disconnected") == 1.0
    });
}

// ---- drain ----------------------------------------------------------------------------------------

fn sigterm(s: &Server) {
    // SAFETY: kill(2) on the child's pid, which this test owns.
    let rc = unsafe { libc::kill(s.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn wait_exit(s: &mut Server, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = s.exit_status() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "sdserve did not exit within {timeout:?}; log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_finishes_running_and_queued_requests_refuses_new_ones_and_exits_0() {
    let repo = long_repo();
    let mut s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "2"])
        .start();
    let speed = calibrate(&s);
    let long_steps = speed.steps(5.0);

    let (long, queued) = std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            s.infer(
                "tiny",
                &prompt_request("in flight", speed.params(long_steps, json!({}))),
            )
        });
        wait_until("the long request to run", START_TIMEOUT, || {
            gauge(&s, "sdserve_requests_running") == 1.0
        });
        let queued = scope.spawn(|| s.infer("tiny", &prompt_request("queued", json!({}))));
        wait_until("the second request to queue", START_TIMEOUT, || {
            gauge(&s, "sdserve_queue_depth") == 1.0
        });

        sigterm(&s);
        wait_until("the drain to begin", Duration::from_secs(10), || {
            s.log().contains("shutdown signal received")
        });
        // While the long request still runs: not ready, no new work, still live.
        let ready = s.get("/v2/health/ready");
        assert_eq!(ready.status, 400, "ready during the drain");
        assert_eq!(s.get("/v2/models/tiny/ready").status, 400);
        s.get("/v2/health/live").expect(200);
        let refused = s.infer("tiny", &prompt_request("too late", json!({})));
        refused.expect(503);
        assert!(
            refused.error().contains("shutting down"),
            "{}",
            refused.error()
        );
        assert_eq!(
            gauge(&s, "sdserve_requests_running"),
            1.0,
            "the checks above must happen while the long request runs"
        );
        (long.join().unwrap(), queued.join().unwrap())
    });
    let side = speed.size as u32;
    assert_eq!(image_sizes(&long.expect(200).json()), vec![(side, side)]);
    queued.expect(200);

    let status = wait_exit(&mut s, START_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        s.log()
    );
    assert!(s.log().contains("sdserve stopped"), "{}", s.log());
}

#[test]
fn requests_still_running_at_the_drain_deadline_are_cancelled_with_a_clear_503() {
    let repo = long_repo();
    let mut s = launch(&repo)
        .args([
            "--parallel-workers",
            "1",
            "--max-queue-size",
            "2",
            "--drain-timeout",
            "1",
        ])
        .start();
    let speed = calibrate(&s);
    let per_step = speed.per_step;
    let long_steps = speed.steps(20.0);
    let expected = long_steps as f64 * per_step;
    let body = prompt_request("endless", speed.params(long_steps, json!({})));

    let (running, queued, signalled) = std::thread::scope(|scope| {
        let running = scope.spawn(|| s.infer("tiny", &body));
        wait_until("the long request to run", START_TIMEOUT, || {
            gauge(&s, "sdserve_requests_running") == 1.0
        });
        let queued = scope.spawn(|| s.infer("tiny", &body));
        wait_until("the second request to queue", START_TIMEOUT, || {
            gauge(&s, "sdserve_queue_depth") == 1.0
        });
        let signalled = Instant::now();
        sigterm(&s);
        (running.join().unwrap(), queued.join().unwrap(), signalled)
    });
    let answered = signalled.elapsed();
    for r in [&running, &queued] {
        r.expect(503);
        let e = r.error();
        assert!(
            e.contains("server shut down before the request finished"),
            "{e}"
        );
    }
    println!(
        "drain deadline: both answered {answered:?} after SIGTERM (work left: {expected:.1} s)"
    );
    assert!(
        answered.as_secs_f64() < 1.0 + expected / 3.0,
        "answered {answered:?} after SIGTERM"
    );
    let status = wait_exit(&mut s, START_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        s.log()
    );
    assert!(s.log().contains("drain timeout reached"), "{}", s.log());
    // Each 503 is logged once, with its request's id, the stage and the cause.
    let log = s.log();
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request not served") && l.contains("status=503"))
        .collect();
    assert_eq!(logged.len(), 2, "{log}");
    for line in logged {
        assert!(line.contains("request_id="), "{line}");
        assert!(
            line.contains("server shut down before the request finished"),
            "{line}"
        );
    }
}

// ---- limits -----------------------------------------------------------------------------------------

#[test]
fn configured_limits_give_clear_400s_and_the_body_limit_413() {
    let repo = repo_with(json!({
        "max_prompts": 2,
        "max_images": 3,
        "max_height": 128,
        "max_width": 128,
        "max_pixels": 8192,
        "max_num_inference_steps": 3,
        "max_prompt_bytes": 16,
        "max_guidance_scale": 12
    }));
    repo.settings(json!({"max_request_body_bytes": 4096}));
    let s = launch(&repo).start();

    let prompts = |data: Value, parameters: Value| {
        let n = data.as_array().unwrap().len();
        json!({"inputs": [{"name": "prompt", "shape": [n], "datatype": "BYTES", "data": data}],
               "parameters": parameters})
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            prompts(json!(["a", "b", "c"]), json!({})),
            "'prompt' holds 3 prompts; at most 2",
        ),
        (
            prompts(json!(["a", "b"]), json!({"num_images_per_prompt": 2})),
            "asks for 4 images (2 prompts × 2); at most 3",
        ),
        (
            prompt_request("a", json!({"num_images_per_prompt": 4})),
            "'num_images_per_prompt' is 4; it must be between 1 and 3",
        ),
        (
            prompt_request("a", json!({"height": 128, "width": 128})),
            "128×128 = 16384 pixels; at most 8192",
        ),
        (
            prompt_request("a", json!({"height": 136})),
            "'height' is 136; it must be a multiple of 8 between 8 and 128",
        ),
        (
            prompt_request("a", json!({"width": 256})),
            "'width' is 256; it must be a multiple of 8 between 8 and 128",
        ),
        (
            prompt_request("a", json!({"num_inference_steps": 4})),
            "'num_inference_steps' is 4; it must be between 1 and 3",
        ),
        (
            prompt_request("seventeen bytes!!", json!({})),
            "'prompt' element 0 is 17 bytes; at most 16",
        ),
        (
            prompt_request("a", json!({"negative_prompt": "x".repeat(40)})),
            "'negative_prompt' element 0 is 40 bytes; at most 16",
        ),
        (
            prompt_request("a", json!({"guidance_scale": 12.5})),
            "'guidance_scale' is 12.5; it must be a finite number between 0 and 12",
        ),
    ];
    for (body, expected) in &cases {
        let r = s.infer("tiny", body);
        r.expect(400);
        let e = r.error();
        assert!(e.contains(expected), "expected {expected:?} in {e:?}");
    }

    // Exactly at every limit is accepted (multi-byte characters count in bytes).
    let at_limit = prompts(
        json!(["sixteen bytes ok", "ünïcödé"]),
        json!({"height": 64, "width": 128, "num_inference_steps": 1, "guidance_scale": 12,
               "negative_prompt": "x".repeat(16)}),
    );
    assert_eq!("ünïcödé".len(), 11);
    let r = s.infer("tiny", &at_limit).expect(200).json();
    assert_eq!(image_sizes(&r), vec![(128, 64), (128, 64)]);

    // The body limit: by Content-Length, by the decoded size of a gzip body, and for a chunked
    // body whose length is not announced.
    let big = prompt_request(&"p".repeat(5000), json!({}));
    let r = s.infer("tiny", &big);
    r.expect(413);
    assert!(r.error().contains("4096 bytes"), "{}", r.error());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );

    let packed = gzip(big.to_string().as_bytes());
    assert!(packed.len() < 4096);
    let r = s.send(
        s.client()
            .post(s.url("/v2/models/tiny/infer"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(packed),
    );
    r.expect(413);
    assert!(r.error().contains("decompressed"), "{}", r.error());

    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(big.to_string().into_bytes()));
    let r = s.send(
        s.client()
            .post(s.url("/v2/models/tiny/infer"))
            .header("content-type", "application/json")
            .body(chunked),
    );
    r.expect(413);
    r.error();

    let m = s.scrape_settled();
    assert_eq!(failures(&m, "invalid"), cases.len() as f64);
    assert_eq!(failures(&m, "too_large"), 3.0);
}

#[test]
fn a_body_far_over_the_limit_still_gets_its_413() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"max_request_body_bytes": 65536}));
    let s = launch(&repo).start();
    // 8 MiB: far more than socket buffers hold, so the server answers while the client still
    // writes; the client must read the 413, not a reset connection.
    let body = prompt_request(&"q".repeat(8 << 20), json!({}));
    for _ in 0..3 {
        let r = s.infer("tiny", &body);
        r.expect(413);
        assert!(r.error().contains("65536 bytes"), "{}", r.error());
    }
    s.infer(
        "tiny",
        &prompt_request("small", json!({"num_inference_steps": 1})),
    )
    .expect(200);
}

// ---- auth -----------------------------------------------------------------------------------------

#[test]
fn bearer_token_guards_inference_and_repository_routes_only() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let token = "s3cret-t0ken";
    repo.settings(json!({"auth_token": token}));
    let s = launch(&repo).start();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1}));
    let guarded = [
        "/v2/models/tiny/infer",
        "/v2/models/tiny/generate",
        "/v2/models/tiny/infer_stream",
        "/v2/models/tiny/generate_stream",
        "/v2/repository/index",
        "/v2/repository/models/tiny/load",
        "/v2/repository/models/tiny/unload",
    ];
    let post = |path: &str, auth: Option<&str>| {
        let mut req = s
            .client()
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        s.send(req)
    };
    let wrong = [
        None,
        Some("Bearer wrong-token"),
        Some("Bearer s3cret-t0ke"),
        Some("Bearer s3cret-t0ken-and-more"),
        Some("Basic czNjcmV0LXQwa2Vu"),
        Some("s3cret-t0ken"),
        Some("Bearer"),
    ];
    for path in guarded {
        for auth in wrong {
            let r = post(path, auth);
            assert_eq!(r.status, 401, "{path} with {auth:?}: {}", r.text());
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
            assert!(r.error().contains("bearer token"), "{}", r.error());
        }
    }
    // Nothing was unloaded or generated by the refused calls.
    s.get("/v2/models/tiny/ready").expect(200);

    let bearer = format!("Bearer {token}");
    let r = post("/v2/models/tiny/infer", Some(&bearer))
        .expect(200)
        .json();
    assert_eq!(image_sizes(&r), vec![(64, 64)]);
    let r = post("/v2/models/tiny/infer_stream", Some(&bearer));
    r.expect(200);
    assert!(r.text().contains("\"outputs\":[{"), "{}", r.text());
    let index = s.send(
        s.client()
            .post(s.url("/v2/repository/index"))
            .header("authorization", &bearer)
            .json(&json!({})),
    );
    assert_eq!(index.expect(200).json()[0]["state"], "READY");
    post("/v2/repository/models/tiny/unload", Some(&bearer)).expect(200);
    post("/v2/repository/models/tiny/load", Some(&bearer)).expect(200);

    // Health, metadata and docs stay open, as do metrics on their own port.
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/tiny",
        "/v2/models/tiny/ready",
        "/v2/docs/dataplane.json",
    ] {
        s.get(path).expect(200);
    }
    assert!(s.scrape().find("sdserve_requests_in_flight", &[]).is_some());
}

// ---- repository path safety -------------------------------------------------------------------------

#[test]
fn repository_load_refuses_names_that_reach_outside_the_root() {
    let repo = Repo::new();
    repo.tiny("tiny");
    // A model outside the repository, reachable only through a link inside it.
    let outside = repo.assets().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("model-settings.json"),
        tiny_settings("outside", None).to_string(),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside, repo.path().join("escape")).unwrap();
    // A settings file inside the repository that is a link to one outside.
    let lonely = repo.assets().join("lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    std::fs::write(
        lonely.join("model-settings.json"),
        tiny_settings("lonely", None).to_string(),
    )
    .unwrap();
    std::fs::create_dir_all(repo.path().join("linked-file")).unwrap();
    std::os::unix::fs::symlink(
        lonely.join("model-settings.json"),
        repo.path().join("linked-file").join("model-settings.json"),
    )
    .unwrap();
    let s = launch(&repo).start();

    let attempts = [
        ("..", 400),
        ("%2e%2e", 400),
        ("%2E%2E", 400),
        (".", 400),
        ("..%2F..%2Fassets%2Foutside", 400),
        ("%2e%2e%2fassets%2foutside", 400),
        ("..%5Coutside", 400),
        ("%2Fetc%2Fpasswd", 400),
        ("%2Ftmp", 400),
        ("tiny%00", 400),
        ("tiny%01", 400),
        ("outside", 404),
        ("escape", 404),
        ("lonely", 404),
        ("linked-file", 404),
        ("assets", 404),
    ];
    for (name, status) in attempts {
        let path = format!("/v2/repository/models/{name}/load");
        let (got, body) = raw_read(raw_send(&s, "POST", &path, &[], b""));
        assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
        let e = error_of(&body);
        assert!(!e.is_empty());
    }
    // Paths that do not even reach the route.
    for path in [
        "/v2/repository/models/../../load",
        "/v2/repository/models/a/b/load",
    ] {
        let (got, body) = raw_read(raw_send(&s, "POST", path, &[], b""));
        assert!(
            (400..500).contains(&got),
            "{path}: {got} {}",
            String::from_utf8_lossy(&body)
        );
    }
    for name in ["outside", "lonely", "escape"] {
        s.get(&format!("/v2/models/{name}/ready")).expect(404);
    }
    let index = s
        .post("/v2/repository/index", &json!({}))
        .expect(200)
        .json();
    assert_eq!(
        index,
        json!([{"name": "tiny", "state": "READY", "reason": ""}])
    );
    // The route itself works for a model inside the root.
    s.post("/v2/repository/models/tiny/unload", &json!({}))
        .expect(200);
    s.post("/v2/repository/models/tiny/load", &json!({}))
        .expect(200);
    s.get("/v2/models/tiny/ready").expect(200);
}

#[test]
fn a_refused_request_with_a_large_body_still_gets_its_503() {
    let repo = long_repo();
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "1"])
        .start();
    let speed = calibrate(&s);
    let long_steps = speed.steps(6.0);
    // 4 MiB of prompt: more than the socket buffers hold, refused before it is read.
    let big = prompt_request(&"z".repeat(4 << 20), json!({}));
    std::thread::scope(|scope| {
        let fill = || {
            s.infer(
                "tiny",
                &prompt_request("filler", speed.params(long_steps, json!({}))),
            )
        };
        let a = scope.spawn(fill);
        let b = scope.spawn(fill);
        wait_until("both slots to be taken", START_TIMEOUT, || {
            gauge(&s, "sdserve_requests_in_flight") == 2.0
        });
        for _ in 0..3 {
            let r = s.infer("tiny", &big);
            r.expect(503);
            assert!(r.error().contains("overloaded"), "{}", r.error());
        }
        a.join().unwrap().expect(200);
        b.join().unwrap().expect(200);
    });
}

#[test]
fn sigterm_while_a_model_loads_exits_0_promptly() {
    let repo = Repo::new();
    let slow = repo.slow_model("slow");
    let mut s = launch(&repo).no_wait_ready().start();
    wait_until("the load to start", START_TIMEOUT, || {
        s.log().contains("loading model slow")
    });
    s.get("/v2/health/ready").expect(400);
    let t = Instant::now();
    sigterm(&s);
    let status = wait_exit(&mut s, Duration::from_secs(20));
    println!("exit {status} {:?} after SIGTERM", t.elapsed());
    assert_eq!(status.code(), Some(0), "log:\n{}", s.log());
    drop(slow);
}
