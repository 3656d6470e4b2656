//! loadgen: drives N concurrent clients against a running sdserve (or any V2 server) for T
//! seconds and reports latency percentiles, throughput, answers by status, requests that got no
//! answer ("lost"), and the server's resident memory before, after warm-up and at the end.
//!
//! ```text
//! cargo run --release -p sdserve-benches --bin loadgen -- \
//!     --url http://127.0.0.1:8080 --model tiny --concurrency 8 --duration 600 --steps 2
//! ```
//!
//! Every client sends one request at a time, on its own connection pool, and waits for the
//! answer (pausing `--backoff-ms` after a 503). `--abandon-every N` makes every Nth request of a
//! client hang up after `--abandon-after-ms` (a client disconnect); `--deadline-every N` gives
//! every Nth request `parameters.timeout = --deadline-ms`. Abandoned requests are counted apart
//! and are not "lost". The server process is found by `--pid`, or by the port it listens on.
//! Exit status 1 when a request was lost or answered with a status other than 200, 503 or 504.
//!
//! This file is also compiled into the end-to-end soak test (`tests/tests/soak.rs`), so it only
//! uses the standard library, `reqwest` and `serde_json`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the HTTP listener, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub duration: Duration,
    /// RSS is sampled once more this long after the start (the "after warm-up" value).
    pub warmup: Duration,
    /// The request body; [`default_body`] when built from the command line without `--body`.
    pub body: Value,
    /// The server process, for RSS; found by the URL's port when `None`.
    pub pid: Option<u32>,
    /// Longest wait for one answer before the request counts as lost.
    pub client_timeout: Duration,
    /// Pause after a 503 before the client's next request.
    pub backoff: Duration,
    /// Every Nth request of each client hangs up after `abandon_after`.
    pub abandon_every: Option<u64>,
    pub abandon_after: Duration,
    /// Every Nth request of each client carries `parameters.timeout = deadline_ms`.
    pub deadline_every: Option<u64>,
    pub deadline_ms: u64,
    /// RSS sampling period.
    pub sample_every: Duration,
}

impl Config {
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            concurrency: 8,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(2),
            body: default_body("a load test", 2),
            pid: None,
            client_timeout: Duration::from_secs(900),
            backoff: Duration::from_millis(100),
            abandon_every: None,
            abandon_after: Duration::from_millis(500),
            deadline_every: None,
            deadline_ms: 200,
            sample_every: Duration::from_secs(1),
        }
    }
}

/// A one-prompt request with `num_inference_steps`.
pub fn default_body(prompt: &str, steps: u64) -> Value {
    json!({
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
        "parameters": {"num_inference_steps": steps}
    })
}

/// Nearest-rank percentiles of a set of latencies, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut seconds: Vec<f64>) -> Self {
        if seconds.is_empty() {
            return Self::default();
        }
        seconds.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            seconds[((p * seconds.len() as f64).ceil() as usize).clamp(1, seconds.len()) - 1]
        };
        Self {
            count: seconds.len(),
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: seconds[seconds.len() - 1],
        }
    }

    fn to_json(self) -> Value {
        json!({"count": self.count, "p50": self.p50, "p95": self.p95, "p99": self.p99, "max": self.max})
    }
}

/// Resident set size samples of the server, in KiB.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rss {
    pub pid: Option<u32>,
    pub before: Option<u64>,
    pub after_warmup: Option<u64>,
    pub end: Option<u64>,
    pub max: Option<u64>,
}

impl Rss {
    /// Growth from the warm-up sample to the end, in percent.
    pub fn growth_after_warmup(&self) -> Option<f64> {
        match (self.after_warmup, self.end) {
            (Some(w), Some(e)) if w > 0 => Some((e as f64 - w as f64) * 100.0 / w as f64),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub elapsed: Duration,
    /// Requests started (abandoned ones included).
    pub sent: u64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer at all (connection error or `client_timeout`).
    pub lost: u64,
    /// Why, for the first few lost requests.
    pub lost_reasons: Vec<String>,
    /// Requests the client hung up on by design.
    pub abandoned: u64,
    /// Latency of 200 answers, and of every answer.
    pub ok_latency: Percentiles,
    pub all_latency: Percentiles,
    pub rss: Rss,
}

impl Report {
    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Answers other than 200, 503 (overloaded, draining) and 504 (deadline).
    pub fn unexpected(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !matches!(s, 200 | 503 | 504))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn ok_per_second(&self) -> f64 {
        self.count(200) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn answers_per_second(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        let statuses: serde_json::Map<String, Value> = self
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), json!(n)))
            .collect();
        json!({
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "sent": self.sent,
            "answered": self.answered(),
            "lost": self.lost,
            "lost_reasons": self.lost_reasons,
            "abandoned": self.abandoned,
            "statuses": statuses,
            "unexpected": self.unexpected(),
            "ok_per_second": self.ok_per_second(),
            "answers_per_second": self.answers_per_second(),
            "latency_ok_seconds": self.ok_latency.to_json(),
            "latency_all_seconds": self.all_latency.to_json(),
            "rss_kib": {
                "pid": self.rss.pid,
                "before": self.rss.before,
                "after_warmup": self.rss.after_warmup,
                "end": self.rss.end,
                "max": self.rss.max,
                "growth_after_warmup_percent": self.rss.growth_after_warmup(),
            },
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let kib = |v: Option<u64>| {
            v.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        out.push_str(&format!(
            "duration        {:.1} s\n",
            self.elapsed.as_secs_f64()
        ));
        out.push_str(&format!(
            "requests        {} sent, {} answered, {} lost, {} abandoned on purpose\n",
            self.sent,
            self.answered(),
            self.lost,
            self.abandoned
        ));
        out.push_str(&format!("statuses        {}\n", statuses.join(", ")));
        out.push_str(&format!(
            "throughput      {:.2} ok/s, {:.2} answers/s\n",
            self.ok_per_second(),
            self.answers_per_second()
        ));
        for (name, p) in [
            ("latency 200", self.ok_latency),
            ("latency all", self.all_latency),
        ] {
            out.push_str(&format!(
                "{name:<16}p50 {:.3} s, p95 {:.3} s, p99 {:.3} s, max {:.3} s ({} answers)\n",
                p.p50, p.p95, p.p99, p.max, p.count
            ));
        }
        out.push_str(&format!(
            "server RSS      before {}, after warm-up {}, end {}, max {} (pid {})\n",
            kib(self.rss.before),
            kib(self.rss.after_warmup),
            kib(self.rss.end),
            kib(self.rss.max),
            self.rss
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "not found".into())
        ));
        if let Some(g) = self.rss.growth_after_warmup() {
            out.push_str(&format!("RSS growth      {g:+.1} % after warm-up\n"));
        }
        for r in &self.lost_reasons {
            out.push_str(&format!("lost: {r}\n"));
        }
        out
    }
}

// ---- the server process ---------------------------------------------------------------------

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The process listening on a TCP port: the socket's inode from `/proc/net/tcp{,6}`, then the
/// process holding a descriptor to it.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

fn port_of(url: &str) -> Option<u16> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host_port = rest.split('/').next()?;
    host_port.rsplit(':').next()?.parse().ok()
}

// ---- the load -------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    sent: u64,
    statuses: BTreeMap<u16, u64>,
    lost: u64,
    lost_reasons: Vec<String>,
    abandoned: u64,
    ok: Vec<f64>,
    all: Vec<f64>,
}

/// Runs the load and waits for every request to end.
pub fn run(config: &Config) -> Report {
    let pid = config
        .pid
        .or_else(|| port_of(&config.url).and_then(pid_listening_on));
    let mut rss = Rss {
        pid,
        ..Default::default()
    };
    rss.before = pid.and_then(rss_kib);
    rss.max = rss.before;
    let url = format!(
        "{}/v2/models/{}/infer",
        config.url.trim_end_matches('/'),
        config.model
    );
    let tally = Mutex::new(Tally::default());
    let rss_state = Mutex::new(rss);
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let stop_at = started + config.duration;

    std::thread::scope(|scope| {
        scope.spawn(|| sample_rss(config, pid, started, &done, &rss_state));
        let clients: Vec<_> = (0..config.concurrency)
            .map(|i| {
                let (url, tally) = (&url, &tally);
                scope.spawn(move || client(config, i as u64, url, stop_at, tally))
            })
            .collect();
        for c in clients {
            let _ = c.join();
        }
        done.store(true, Ordering::SeqCst);
    });

    let mut rss = rss_state.into_inner().unwrap_or_else(|e| e.into_inner());
    rss.end = pid.and_then(rss_kib);
    rss.max = rss.max.max(rss.end);
    let t = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    Report {
        elapsed: started.elapsed(),
        sent: t.sent,
        statuses: t.statuses,
        lost: t.lost,
        lost_reasons: t.lost_reasons,
        abandoned: t.abandoned,
        ok_latency: Percentiles::of(t.ok),
        all_latency: Percentiles::of(t.all),
        rss,
    }
}

fn sample_rss(
    config: &Config,
    pid: Option<u32>,
    started: Instant,
    done: &AtomicBool,
    rss: &Mutex<Rss>,
) {
    let Some(pid) = pid else { return };
    let mut warm_taken = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50).min(config.sample_every));
        let now = rss_kib(pid);
        let mut r = rss.lock().unwrap_or_else(|e| e.into_inner());
        r.max = r.max.max(now);
        if !warm_taken && started.elapsed() >= config.warmup {
            r.after_warmup = now;
            warm_taken = true;
        }
    }
}

fn client(config: &Config, index: u64, url: &str, stop_at: Instant, tally: &Mutex<Tally>) {
    let build = |timeout: Duration| {
        reqwest::blocking::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .expect("HTTP client")
    };
    let patient = build(config.client_timeout);
    let impatient = build(config.abandon_after);
    let mut n: u64 = 0;
    while Instant::now() < stop_at {
        n += 1;
        let abandon = config
            .abandon_every
            .is_some_and(|k| k > 0 && n.is_multiple_of(k));
        let mut body = config.body.clone();
        if let Some(params) = body.get_mut("parameters").and_then(Value::as_object_mut) {
            params.insert("seed".into(), json!(index * 1_000_000 + n));
            if config
                .deadline_every
                .is_some_and(|k| k > 0 && n.is_multiple_of(k))
            {
                params.insert("timeout".into(), json!(config.deadline_ms));
            }
        }
        let http = if abandon { &impatient } else { &patient };
        let t = Instant::now();
        let result = http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .and_then(|r| {
                let status = r.status().as_u16();
                r.bytes().map(|_| status)
            });
        let seconds = t.elapsed().as_secs_f64();
        let mut tl = tally.lock().unwrap_or_else(|e| e.into_inner());
        tl.sent += 1;
        match result {
            Ok(status) => {
                *tl.statuses.entry(status).or_default() += 1;
                tl.all.push(seconds);
                if status == 200 {
                    tl.ok.push(seconds);
                }
                drop(tl);
                if status == 503 {
                    std::thread::sleep(config.backoff);
                }
            }
            Err(e) if abandon && e.is_timeout() => tl.abandoned += 1,
            Err(e) => {
                tl.lost += 1;
                if tl.lost_reasons.len() < 10 {
                    tl.lost_reasons.push(format!("{e:?}"));
                }
            }
        }
    }
}

// ---- command line ---------------------------------------------------------------------------

const USAGE: &str =
    "usage: loadgen [--url URL] [--model NAME] [--concurrency N] [--duration SECONDS]
               [--warmup SECONDS] [--steps N] [--prompt TEXT] [--body FILE.json]
               [--pid PID] [--client-timeout SECONDS] [--backoff-ms MS]
               [--abandon-every N] [--abandon-after-ms MS] [--deadline-every N] [--deadline-ms MS]
               [--json]";

fn parse_args(args: &[String]) -> Result<(Config, bool), String> {
    let mut c = Config::new("http://127.0.0.1:8080", "tiny");
    let (mut steps, mut prompt, mut body_file, mut json_out) =
        (2u64, "a load test".to_owned(), None, false);
    let mut warmup = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--json" {
            json_out = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |what: &str| -> Result<f64, String> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{what} must be a non-negative number, got {value:?}"))
        };
        let secs = |what: &str| num(what).map(Duration::from_secs_f64);
        let ms = |what: &str| num(what).map(|v| Duration::from_secs_f64(v / 1000.0));
        let count = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what} must be a whole number, got {value:?}"))
        };
        match flag.as_str() {
            "--url" => c.url = value.clone(),
            "--model" => c.model = value.clone(),
            "--concurrency" => c.concurrency = count("--concurrency")?.max(1) as usize,
            "--duration" => c.duration = secs("--duration")?,
            "--warmup" => warmup = Some(secs("--warmup")?),
            "--steps" => steps = count("--steps")?,
            "--prompt" => prompt = value.clone(),
            "--body" => body_file = Some(value.clone()),
            "--pid" => c.pid = Some(count("--pid")? as u32),
            "--client-timeout" => c.client_timeout = secs("--client-timeout")?,
            "--backoff-ms" => c.backoff = ms("--backoff-ms")?,
            "--abandon-every" => c.abandon_every = Some(count("--abandon-every")?),
            "--abandon-after-ms" => c.abandon_after = ms("--abandon-after-ms")?,
            "--deadline-every" => c.deadline_every = Some(count("--deadline-every")?),
            "--deadline-ms" => c.deadline_ms = count("--deadline-ms")?,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    c.body = match body_file {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON: {e}"))?
        }
        None => default_body(&prompt, steps),
    };
    c.warmup = warmup.unwrap_or(c.duration / 10);
    Ok((c, json_out))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, json_out) = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    eprintln!(
        "loadgen: {} clients for {:.0} s against {} (model {})",
        config.concurrency,
        config.duration.as_secs_f64(),
        config.url,
        config.model
    );
    let report = run(&config);
    if json_out {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if report.lost > 0 || report.unexpected() > 0 {
        std::process::exit(1);
    }
}
