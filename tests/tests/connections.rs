//! Connection hygiene on the real binary: a flood of idle and half-sent connections, more than
//! the configured bound, is closed by the timeouts while health and inference keep answering,
//! and the server's open descriptors return to their baseline; a connection busy with a request
//! is never cut, however long the request takes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sdserve_tests::*;

const BOUND: usize = 20;

fn server() -> (Repo, Server) {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({
        "max_connections": BOUND,
        "keep_alive_timeout": 1,
        "header_read_timeout": 1
    }));
    let s = launch(&repo).start();
    (repo, s)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .expect("the server's descriptors")
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A refusal or a 408-style answer before the close: read on.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_half_sent_connections_beyond_the_bound_are_closed_and_clients_still_served() {
    let (_repo, s) = server();
    let addr = ("127.0.0.1", s.http_port);
    // Warm up once, then count the descriptors the server holds at rest.
    s.infer(
        "tiny",
        &prompt_request("warm", json!({"num_inference_steps": 1})),
    )
    .expect(200);
    // A fresh connection per probe, as kubelet's probes connect: a pooled idle connection may
    // rightly be the one evicted to make room for the flood.
    let rest = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // the warm-up connection idles out
    let baseline = open_fds(s.pid());

    let mut flood: Vec<TcpStream> = Vec::new();
    for i in 0..(2 * BOUND + 5) {
        let mut c = TcpStream::connect(addr).expect("connect");
        if i % 3 == 0 {
            c.write_all(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-")
                .unwrap();
        }
        flood.push(c);
        if i % 10 == 9 {
            // Health and inference answer while the flood holds every slot.
            let health = rest.get(s.url("/v2/health/ready")).send().expect("health");
            assert_eq!(health.status().as_u16(), 200, "health during the flood");
        }
    }
    s.infer(
        "tiny",
        &prompt_request("during", json!({"num_inference_steps": 1})),
    )
    .expect(200);

    // Every flood connection is closed: evicted to make room, or by the timeouts.
    let started = Instant::now();
    for (i, c) in flood.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "flood connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    wait_until(
        "descriptors back to the baseline",
        Duration::from_secs(10),
        || open_fds(s.pid()) <= baseline + 2,
    );
    println!(
        "baseline {baseline} descriptors; {} after the flood closed",
        open_fds(s.pid())
    );
}

#[test]
fn a_connection_busy_with_a_long_request_is_not_cut() {
    let (_repo, s) = server();
    // Steps enough to outlast the 1 s keep-alive timeout several times over.
    let body = prompt_request(
        "slow",
        json!({"num_inference_steps": 60, "height": 256, "width": 256}),
    );
    let t = Instant::now();
    let r = s.infer("tiny", &body);
    r.expect(200);
    let took = t.elapsed();
    println!("a {took:?} request on a 1 s keep-alive timeout");
    assert!(
        took > Duration::from_secs(2),
        "the request must outlast the timeout: {took:?}"
    );
}

#[test]
fn when_every_connection_is_busy_a_newcomer_gets_a_503_and_the_busy_ones_finish() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"max_connections": 2}));
    let s = launch(&repo).start();
    let body = prompt_request(
        "busy",
        json!({"num_inference_steps": 25, "height": 128, "width": 128}),
    )
    .to_string();
    let send = |body: &str| {
        let mut c = TcpStream::connect(("127.0.0.1", s.http_port)).unwrap();
        let head = format!(
            "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(body.as_bytes()).unwrap();
        c
    };
    let status = |mut c: TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        (code, text)
    };
    let busy = [send(&body), send(&body)];
    // Both are in flight (one generating, one queued) once the server holds both bodies.
    wait_until("two requests in flight", Duration::from_secs(30), || {
        s.scrape()
            .find("sdserve_requests_in_flight", &[])
            .unwrap_or(0.0)
            >= 2.0
    });
    let (code, text) = status(TcpStream::connect(("127.0.0.1", s.http_port)).unwrap());
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("too many open connections"), "{text}");
    for c in busy {
        assert_eq!(status(c).0, 200);
    }
}

/// The HTTP/2 preface and an empty SETTINGS frame; true when the server answers with its own
/// SETTINGS frame, as every gRPC connection starts.
fn http2_handshake_answers(port: u16) -> bool {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if c.write_all(&hello).is_err() {
        return false;
    }
    let mut frame = [0u8; 9];
    c.read_exact(&mut frame).is_ok() && frame[3] == 4
}

#[test]
fn the_grpc_listener_closes_idle_and_half_sent_connections_beyond_the_bound_too() {
    let (_repo, s) = server();
    let port = s.grpc_port();
    assert!(http2_handshake_answers(port), "gRPC answers at rest");
    std::thread::sleep(Duration::from_millis(2500)); // that connection idles out
    let baseline = open_fds(s.pid());

    let mut flood: Vec<TcpStream> = Vec::new();
    for i in 0..(2 * BOUND + 5) {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if i % 3 == 0 {
            // Half of the HTTP/2 preface, and nothing more.
            c.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
        }
        flood.push(c);
        if i % 10 == 9 {
            assert!(
                http2_handshake_answers(port),
                "gRPC answers a newcomer while the flood holds every slot ({i} open)"
            );
            let health = s.get("/v2/health/live");
            assert_eq!(health.status, 200, "HTTP health during the gRPC flood");
        }
    }
    let started = Instant::now();
    for (i, c) in flood.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "gRPC flood connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    wait_until(
        "descriptors back to the baseline",
        Duration::from_secs(10),
        || open_fds(s.pid()) <= baseline + 2,
    );
    assert!(
        http2_handshake_answers(port),
        "gRPC answers after the flood"
    );
}
