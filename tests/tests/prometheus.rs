//! A real Prometheus scrapes sdserve through a scripted workload (successes, every kind of
//! failure, requests that queue and requests refused for a full queue), then answers every
//! PromQL query of `docs/metrics.md`, every expression of the Grafana dashboard and every
//! alert rule of `deploy/prometheus/alerts.yml`; the answers are checked against what the
//! workload produced.
//!
//! Every series exists before Prometheus' first scrape, so the first sample of each is the
//! state before the measured workload and the increases Prometheus computes are that
//! workload's, up to its extrapolation at the window edges (bounded below).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sdserve_tests::*;

const INFER: &str = "/v2/models/{model_name}/infer";
const READY: &str = "/v2/models/{model_name}/ready";

/// The queries of `docs/metrics.md`, as written there (the p50/p95/p99 row is run with each
/// quantile; the last one needs `ignoring(le)`, see [`WAITED_AS_WRITTEN`]).
const DOCUMENT_QUERIES: &[(&str, &str)] = &[
    (
        "E2E Request Latency (1m)",
        r#"rate(rest_server_request_duration_seconds_sum{path="/v2/models/{model_name}/infer"}[1m]) / rate(rest_server_request_duration_seconds_count{path="/v2/models/{model_name}/infer"}[1m])"#,
    ),
    (
        "Inference Throughput (1m)",
        "rate(model_infer_request_success_total[1m])",
    ),
    (
        "requests per second",
        "rate(model_infer_request_duration_count[5m])",
    ),
    (
        "mean generation time",
        "rate(model_infer_request_duration_sum[5m]) / rate(model_infer_request_duration_count[5m])",
    ),
    (
        "generations per day",
        "increase(model_infer_request_duration_count[24h])",
    ),
    (
        "infer RPS",
        r#"rate(rest_server_requests_total{path="/v2/models/{model_name}/infer"}[5m])"#,
    ),
    (
        "HTTP error percentage",
        r#"(rate(rest_server_requests_total{status_code!="200"}[5m]) / rate(rest_server_requests_total[5m])) * 100"#,
    ),
    ("current load", "sum(rest_server_requests_in_progress)"),
    (
        "p50 HTTP latency",
        "histogram_quantile(0.5, rate(rest_server_request_duration_seconds_bucket[5m]))",
    ),
    (
        "p95 HTTP latency",
        "histogram_quantile(0.95, rate(rest_server_request_duration_seconds_bucket[5m]))",
    ),
    (
        "p99 HTTP latency",
        "histogram_quantile(0.99, rate(rest_server_request_duration_seconds_bucket[5m]))",
    ),
    (
        "generation failure percentage",
        "(rate(model_infer_request_failure_total[5m]) / (rate(model_infer_request_success_total[5m]) + rate(model_infer_request_failure_total[5m]))) * 100",
    ),
    (
        "mean queue wait",
        "rate(parallel_request_queue_sum[5m]) / rate(parallel_request_queue_count[5m])",
    ),
    (
        "p95 queue wait",
        "histogram_quantile(0.95, rate(parallel_request_queue_bucket[5m]))",
    ),
    (
        "requests that waited more than 2 s",
        r#"parallel_request_queue_bucket{le="+Inf"} - ignoring(le) parallel_request_queue_bucket{le="2.5"}"#,
    ),
];

/// The last query exactly as the document writes it. Its two sides differ in `le`, so
/// PromQL's one-to-one matching pairs nothing and it is empty against any exporter; the list
/// above runs it with `ignoring(le)`.
const WAITED_AS_WRITTEN: &str =
    r#"parallel_request_queue_bucket{le="+Inf"} - parallel_request_queue_bucket{le="2.5"}"#;

/// Exposed series name → its labels (besides `job` and `instance`, which Prometheus adds).
const DOCUMENT_SERIES: &[(&str, &[&str])] = &[
    ("model_infer_request_duration_count", &["model", "version"]),
    ("model_infer_request_duration_sum", &["model", "version"]),
    (
        "rest_server_requests_total",
        &["method", "path", "status_code"],
    ),
    ("rest_server_requests_in_progress", &["method"]),
    (
        "rest_server_request_duration_seconds_bucket",
        &["method", "path", "status_code", "le"],
    ),
    (
        "rest_server_request_duration_seconds_sum",
        &["method", "path", "status_code"],
    ),
    (
        "rest_server_request_duration_seconds_count",
        &["method", "path", "status_code"],
    ),
    ("model_infer_request_success_total", &["model", "version"]),
    ("model_infer_request_failure_total", &["model", "version"]),
    ("parallel_request_queue_bucket", &["le"]),
    ("parallel_request_queue_sum", &[]),
    ("parallel_request_queue_count", &[]),
    ("sdserve_queue_depth", &[]),
];

/// Family → type, as Prometheus' metadata API reports them from the scrapes.
const DOCUMENT_TYPES: &[(&str, &str)] = &[
    ("model_infer_request_duration", "summary"),
    ("rest_server_requests_total", "counter"),
    ("rest_server_requests_in_progress", "gauge"),
    ("rest_server_request_duration_seconds", "histogram"),
    ("model_infer_request_success_total", "counter"),
    ("model_infer_request_failure_total", "counter"),
    ("parallel_request_queue", "histogram"),
    ("sdserve_queue_depth", "gauge"),
];

/// Panels the dashboard must have.
const DASHBOARD_PANELS: &[&str] = &[
    "E2E Request Latency (1m)",
    "Inference Throughput (1m)",
    "HTTP error percentage",
    "Infer latency p50 / p95 / p99",
    "Queue wait (mean and p95)",
    "Queue depth",
    "Requests in progress",
];

/// Shortest span of scrapes the checks run on: Prometheus extrapolates each series by up to
/// half a scrape interval depending on its first value, so ratios of increases are exact to
/// about `interval / span`.
const MIN_SPAN: Duration = Duration::from_secs(20);

type Labels = BTreeMap<String, String>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn number(v: &Value) -> f64 {
    match v.as_str().expect("sample value is a string") {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        s => s.parse().unwrap_or_else(|_| panic!("sample value {s:?}")),
    }
}

/// One element of an instant vector, without `__name__`, `job` and `instance`.
#[derive(Debug, Clone)]
struct Element {
    labels: Labels,
    name: Option<String>,
    value: f64,
}

fn own_labels(metric: &Value) -> (Labels, Option<String>) {
    let mut labels: Labels = metric
        .as_object()
        .expect("metric labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_owned()))
        .collect();
    let name = labels.remove("__name__");
    labels.remove("job");
    labels.remove("instance");
    (labels, name)
}

fn vector(data: &Value) -> Vec<Element> {
    assert_eq!(data["resultType"], "vector", "{data}");
    data["result"]
        .as_array()
        .expect("result")
        .iter()
        .map(|e| {
            let (labels, name) = own_labels(&e["metric"]);
            Element {
                labels,
                name,
                value: number(&e["value"][1]),
            }
        })
        .collect()
}

/// Raw samples of a range selector: labels → [(timestamp, value)].
fn matrix(data: &Value) -> BTreeMap<Labels, Vec<(f64, f64)>> {
    assert_eq!(data["resultType"], "matrix", "{data}");
    data["result"]
        .as_array()
        .expect("result")
        .iter()
        .map(|e| {
            let (labels, _) = own_labels(&e["metric"]);
            let samples = e["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|p| (p[0].as_f64().expect("timestamp"), number(&p[1])))
                .collect();
            (labels, samples)
        })
        .collect()
}

fn by_labels(elements: &[Element]) -> BTreeMap<Labels, f64> {
    elements
        .iter()
        .map(|e| (e.labels.clone(), e.value))
        .collect()
}

#[track_caller]
fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        got.is_finite() && (got - want).abs() <= rel * want.abs() + 1e-9,
        "{what}: Prometheus answered {got}, the workload gives {want} (±{:.0} %)",
        rel * 100.0
    );
}

/// What sdserve exposed, by series name and labels (one scrape of our own).
struct State(BTreeMap<String, BTreeMap<Labels, f64>>);

impl State {
    fn of(m: &Metrics) -> Self {
        let mut out: BTreeMap<String, BTreeMap<Labels, f64>> = BTreeMap::new();
        for s in &m.samples {
            out.entry(s.name.clone())
                .or_default()
                .insert(s.labels.clone(), s.value);
        }
        State(out)
    }

    fn series(&self, name: &str) -> BTreeMap<Labels, f64> {
        self.0.get(name).cloned().unwrap_or_default()
    }

    #[track_caller]
    fn get(&self, name: &str, l: &Labels) -> f64 {
        *self
            .0
            .get(name)
            .and_then(|s| s.get(l))
            .unwrap_or_else(|| panic!("sdserve exposed no {name}{l:?}"))
    }
}

/// The increase of every series of `name` from `before` to `after`.
fn delta(before: &State, after: &State, name: &str) -> BTreeMap<Labels, f64> {
    after
        .series(name)
        .into_iter()
        .map(|(l, v)| {
            let b = before.series(name).get(&l).copied().unwrap_or(0.0);
            (l, v - b)
        })
        .collect()
}

/// `histogram_quantile` of Prometheus for a given rank, over cumulative buckets
/// (upper bound, count) sorted by bound and ending in +Inf.
fn quantile_at_rank(buckets: &[(f64, f64)], rank: f64) -> f64 {
    let b = buckets
        .iter()
        .position(|(_, c)| *c >= rank)
        .expect("rank within the count");
    if b == buckets.len() - 1 {
        return buckets[b - 1].0;
    }
    let (start, below) = if b == 0 {
        (0.0, 0.0)
    } else {
        (buckets[b - 1].0, buckets[b - 1].1)
    };
    let (end, count) = buckets[b];
    start + (end - start) * (rank - below) / (count - below)
}

/// The values `histogram_quantile(q, ...)` can take over these bucket increases when each
/// bucket's extrapolation may differ by the relative tolerance `tol`.
fn quantile_band(buckets: &[(f64, f64)], q: f64, tol: f64) -> (f64, f64) {
    let total = buckets.last().expect("buckets").1;
    let rank = q * total;
    (
        quantile_at_rank(buckets, rank * (1.0 - tol)),
        quantile_at_rank(buckets, (rank * (1.0 + tol)).min(total)),
    )
}

/// Bucket increases of histogram `family` for the series with labels `l` (without `le`).
fn bucket_deltas(before: &State, after: &State, family: &str, l: &Labels) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = delta(before, after, &format!("{family}_bucket"))
        .into_iter()
        .filter_map(|(mut labels, v)| {
            let le = labels.remove("le")?;
            (&labels == l).then(|| {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                (bound, v)
            })
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

fn ok_request(steps: u32) -> Value {
    prompt_request("a red circle", json!({"num_inference_steps": steps}))
}

/// One of each failure the document counts, plus the readiness checks.
fn failures(s: &Server) {
    s.infer("nope", &ok_request(1)).expect(404);
    let missing_prompt = json!({"inputs": [{"name": "negative_prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}]});
    s.infer("tiny", &missing_prompt).expect(400);
    s.post_bytes("/v2/models/tiny/infer", b"{\"inputs\": [".to_vec())
        .expect(422);
    s.get("/v2/models/tiny/ready").expect(200);
    s.get("/v2/models/nope/ready").expect(404);
}

/// With one worker and one queue slot: a long request runs, a second one waits in the queue
/// behind it, and `refused` more are turned away with 503 while both are admitted.
fn queue_and_overflow(s: &Server, long_steps: u32, refused: usize) {
    // At 256² a step costs enough that the long request lasts seconds.
    let long_request = prompt_request(
        "a red circle",
        json!({"num_inference_steps": long_steps, "height": 256, "width": 256}),
    );
    std::thread::scope(|scope| {
        let long = scope.spawn(|| s.infer("tiny", &long_request));
        wait_until("the long request to run", START_TIMEOUT, || {
            s.gauge("sdserve_requests_running") == 1.0
        });
        let queued = scope.spawn(|| s.infer("tiny", &ok_request(2)));
        wait_until("the second request to be queued", START_TIMEOUT, || {
            s.gauge("sdserve_queue_depth") == 1.0
        });
        for _ in 0..refused {
            s.infer("tiny", &ok_request(1)).expect(503);
        }
        long.join().expect("client thread").expect(200);
        queued.join().expect("client thread").expect(200);
    });
}

fn scrape_config(metrics_port: u16) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: sdserve\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n"
    )
}

/// Whether Prometheus' latest samples of `name` equal `want` (our own scrape).
fn prometheus_has(prom: &Prometheus, name: &str, want: &BTreeMap<Labels, f64>) -> bool {
    let Ok(data) = prom.try_query(name, None) else {
        return false;
    };
    by_labels(&vector(&data)) == *want
}

/// The scrapes of `up` in a window of `range` ending at `t`: (span in seconds, mean interval).
fn scrapes(prom: &Prometheus, range: &str, t: f64) -> (f64, f64) {
    let raw = matrix(&prom.query(&format!("up{{job=\"sdserve\"}}[{range}]"), Some(t)));
    let samples = raw.values().next().expect("samples of up");
    assert!(
        samples.len() >= 3,
        "too few scrapes in {range}: {samples:?}"
    );
    let span = samples.last().unwrap().0 - samples[0].0;
    (span, span / (samples.len() - 1) as f64)
}

/// Bounds of Prometheus' extrapolation factor (increase ÷ true increase) for a window of
/// `range` ending at `t`: at most 1.1 intervals at each end.
fn extrapolation(prom: &Prometheus, range: &str, t: f64) -> (f64, f64) {
    let (span, step) = scrapes(prom, range, t);
    (1.0, (span + 2.0 * 1.1 * step) / span)
}

fn range_seconds(range: &str) -> f64 {
    match range {
        "1m" => 60.0,
        "5m" => 300.0,
        "24h" => 86400.0,
        other => panic!("range {other}"),
    }
}

/// Checks an increase (or `rate` × range) against the true increase and the extrapolation.
#[track_caller]
fn assert_increase(what: &str, got: f64, want: f64, bounds: (f64, f64)) {
    assert!(
        got >= want * bounds.0 - 1e-9 && got <= want * bounds.1 + 1e-9,
        "{what}: Prometheus answered {got}, the workload's increase is {want} \
         (extrapolation allows ×{:.3}..×{:.3})",
        bounds.0,
        bounds.1
    );
}

#[test]
fn prometheus_answers_the_document_queries_dashboard_and_alerts() {
    let started = Instant::now();
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "1"])
        .start();

    // Before Prometheus: every series the workload touches is created.
    s.infer("tiny", &ok_request(1)).expect(200);
    failures(&s);
    queue_and_overflow(&s, 20, 1);
    let before = State::of(&s.scrape_settled());

    let alerts = std::fs::read(workspace_root().join("deploy/prometheus/alerts.yml"))
        .expect("reading deploy/prometheus/alerts.yml");
    let prom = Prometheus::start(
        &scrape_config(s.metrics_port()),
        &[("alerts.yml", alerts.as_slice())],
    );
    let rest_before = before.series("rest_server_requests_total");
    wait_until("Prometheus' first scrape", Duration::from_secs(30), || {
        prometheus_has(&prom, "rest_server_requests_total", &rest_before)
    });

    // The measured workload.
    let sequential = [1, 2, 3];
    for steps in sequential {
        s.infer("tiny", &ok_request(steps)).expect(200);
    }
    failures(&s);
    failures(&s);
    // The second request waits for the whole of the first one (several seconds).
    let refused = 2;
    queue_and_overflow(&s, 80, refused);
    // Both admitted requests succeed.
    let successes = sequential.len() + 2;
    let after = State::of(&s.scrape_settled());

    // The workload, as counted by sdserve.
    let rest = |method: &str, path: &str, status: &str| {
        labels(&[("method", method), ("path", path), ("status_code", status)])
    };
    let mv = |model: &str| labels(&[("model", model), ("version", "None")]);
    let rest_delta = delta(&before, &after, "rest_server_requests_total");
    let expected_rest: BTreeMap<Labels, f64> = [
        (rest("POST", INFER, "200"), successes as f64),
        (rest("POST", INFER, "404"), 2.0),
        (rest("POST", INFER, "400"), 2.0),
        (rest("POST", INFER, "422"), 2.0),
        (rest("POST", INFER, "503"), refused as f64),
        (rest("GET", READY, "200"), 2.0),
        (rest("GET", READY, "404"), 2.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        rest_delta, expected_rest,
        "rest_server_requests_total increase"
    );
    let success_delta = delta(&before, &after, "model_infer_request_success_total");
    let failure_delta = delta(&before, &after, "model_infer_request_failure_total");
    assert_eq!(success_delta[&mv("tiny")], successes as f64);
    assert_eq!(failure_delta[&mv("tiny")], 2.0 + 2.0 + refused as f64);
    assert_eq!(failure_delta[&mv("nope")], 2.0);
    let queue_count = after.get("parallel_request_queue_count", &Labels::new())
        - before.get("parallel_request_queue_count", &Labels::new());
    assert_eq!(
        queue_count, successes as f64,
        "only admitted requests queue"
    );
    let queue_sum = after.get("parallel_request_queue_sum", &Labels::new())
        - before.get("parallel_request_queue_sum", &Labels::new());
    assert!(queue_sum > 0.5, "the queued request waited {queue_sum} s");

    // Prometheus has scraped the final state.
    for name in [
        "rest_server_requests_total",
        "rest_server_request_duration_seconds_count",
        "model_infer_request_duration_count",
        "model_infer_request_success_total",
        "model_infer_request_failure_total",
        "parallel_request_queue_count",
        "parallel_request_queue_sum",
    ] {
        let want = after.series(name);
        wait_until(
            &format!("Prometheus to scrape the final {name}"),
            Duration::from_secs(30),
            || prometheus_has(&prom, name, &want),
        );
    }
    // Long enough a span that extrapolation barely moves ratios (see MIN_SPAN).
    let first_scrape = matrix(&prom.query("up[5m]", None))
        .values()
        .next()
        .expect("samples of up")[0]
        .0;
    let ready_at = first_scrape + MIN_SPAN.as_secs_f64();
    if now() < ready_at {
        std::thread::sleep(Duration::from_secs_f64(ready_at - now()));
    }
    let t = now();
    let (span, step) = scrapes(&prom, "5m", t);
    // Every series starts at the first scrape; their start extrapolations differ by at most
    // half an interval (1.1 intervals, with jitter), twice that for a ratio of two of them.
    let tol = (1.1 * step / span).max(0.01);

    // The first sample in the 5 m window is the state before the workload.
    for name in [
        "rest_server_requests_total",
        "model_infer_request_duration_count",
        "parallel_request_queue_count",
    ] {
        let raw = matrix(&prom.query(&format!("{name}[5m]"), Some(t)));
        let first: BTreeMap<Labels, f64> = raw.iter().map(|(l, v)| (l.clone(), v[0].1)).collect();
        assert_eq!(first, before.series(name), "first samples of {name}");
    }

    // Names, labels and buckets as Prometheus stored them.
    for (name, keys) in DOCUMENT_SERIES {
        let elements = vector(&prom.query(&format!("{{__name__=\"{name}\"}}"), Some(t)));
        assert!(!elements.is_empty(), "Prometheus has no series {name}");
        let want: BTreeSet<&str> = keys.iter().copied().collect();
        for e in &elements {
            assert_eq!(e.name.as_deref(), Some(*name));
            let got: BTreeSet<&str> = e.labels.keys().map(String::as_str).collect();
            assert_eq!(got, want, "labels of {name} (besides job and instance)");
        }
    }
    for family in [
        "rest_server_request_duration_seconds",
        "parallel_request_queue",
    ] {
        let mut bounds: BTreeMap<Labels, Vec<String>> = BTreeMap::new();
        for e in vector(&prom.query(&format!("{family}_bucket"), Some(t))) {
            let mut l = e.labels.clone();
            let le = l.remove("le").expect("le");
            bounds.entry(l).or_default().push(le);
        }
        assert!(!bounds.is_empty(), "{family} has no buckets");
        for (l, mut les) in bounds {
            les.sort_by(|a, b| {
                let f = |s: &str| s.parse::<f64>().unwrap_or(f64::INFINITY);
                f(a).total_cmp(&f(b))
            });
            assert_eq!(les, DOCUMENT_BUCKETS, "buckets of {family}{l:?}");
        }
    }
    let metadata = prom.api("/api/v1/metadata");
    for (family, kind) in DOCUMENT_TYPES {
        assert_eq!(
            metadata[*family][0]["type"], *kind,
            "type of {family} in Prometheus' metadata: {}",
            metadata[*family]
        );
    }

    // Every document query returns data.
    let mut answers: BTreeMap<&str, Vec<Element>> = BTreeMap::new();
    for (what, expr) in DOCUMENT_QUERIES {
        let elements = vector(&prom.query(expr, Some(t)));
        assert!(
            !elements.is_empty(),
            "{what}: `{expr}` returned an empty vector"
        );
        answers.insert(what, elements);
    }
    let five = extrapolation(&prom, "5m", t);
    let day = extrapolation(&prom, "24h", t);
    let minute = extrapolation(&prom, "1m", t);

    // E2E Request Latency (1m): mean seconds per infer request, by status, over the window's
    // samples (sum and count share their scrapes, so extrapolation cancels).
    let in_minute = |name: &str| -> BTreeMap<Labels, f64> {
        let raw = matrix(&prom.query(&format!("{name}{{path=\"{INFER}\"}}[1m]"), Some(t)));
        raw.into_iter()
            .map(|(l, v)| (l, v.last().unwrap().1 - v[0].1))
            .collect()
    };
    let sums = in_minute("rest_server_request_duration_seconds_sum");
    let counts = in_minute("rest_server_request_duration_seconds_count");
    let e2e = by_labels(&answers["E2E Request Latency (1m)"]);
    assert_eq!(
        e2e.keys().collect::<Vec<_>>(),
        counts.keys().collect::<Vec<_>>(),
        "E2E latency series"
    );
    for (l, got) in &e2e {
        if counts[l] == 0.0 {
            assert!(got.is_nan(), "E2E latency {l:?} without requests: {got}");
        } else {
            assert_close(
                &format!("E2E latency {l:?}"),
                *got,
                sums[l] / counts[l],
                tol,
            );
        }
    }
    let ok_latency = e2e[&rest("POST", INFER, "200")];
    assert!(ok_latency > 0.0, "mean latency of successes {ok_latency}");

    // Inference Throughput (1m): per model and version (a model that only failed has a
    // success series at 0).
    let raw = matrix(&prom.query("model_infer_request_success_total[1m]", Some(t)));
    let throughput = by_labels(&answers["Inference Throughput (1m)"]);
    assert_eq!(
        throughput.keys().collect::<Vec<_>>(),
        raw.keys().collect::<Vec<_>>()
    );
    for (l, samples) in &raw {
        let in_window = samples.last().unwrap().1 - samples[0].1;
        assert_increase(
            &format!("Inference Throughput (1m) {l:?} × 60 s"),
            throughput[l] * range_seconds("1m"),
            in_window,
            minute,
        );
    }
    assert!(throughput[&mv("tiny")] > 0.0);

    // requests per second and generations per day: per model, failures included.
    let count_delta = delta(&before, &after, "model_infer_request_duration_count");
    assert_eq!(count_delta[&mv("tiny")], successes as f64 + 6.0);
    assert_eq!(count_delta[&mv("nope")], 2.0);
    let rps = by_labels(&answers["requests per second"]);
    let per_day = by_labels(&answers["generations per day"]);
    assert_eq!(
        rps.keys().collect::<Vec<_>>(),
        count_delta.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        per_day.keys().collect::<Vec<_>>(),
        count_delta.keys().collect::<Vec<_>>()
    );
    for (l, want) in &count_delta {
        assert_increase(
            &format!("requests per second {l:?} × 300 s"),
            rps[l] * 300.0,
            *want,
            five,
        );
        assert_increase(
            &format!("generations per day {l:?}"),
            per_day[l],
            *want,
            day,
        );
    }

    // mean generation time: queue wait plus generation, per model.
    let sum_delta = delta(&before, &after, "model_infer_request_duration_sum");
    let mean_generation = by_labels(&answers["mean generation time"]);
    for (l, n) in &count_delta {
        assert_close(
            &format!("mean generation time {l:?}"),
            mean_generation[l],
            sum_delta[l] / n,
            tol,
        );
    }
    assert!(mean_generation[&mv("tiny")] > 0.0);

    // infer RPS: by status.
    let infer_rps = by_labels(&answers["infer RPS"]);
    let infer_delta: BTreeMap<Labels, f64> = rest_delta
        .iter()
        .filter(|(l, _)| l["path"] == INFER)
        .map(|(l, v)| (l.clone(), *v))
        .collect();
    assert_eq!(
        infer_rps.keys().collect::<Vec<_>>(),
        infer_delta.keys().collect::<Vec<_>>()
    );
    for (l, want) in &infer_delta {
        assert_increase(
            &format!("infer RPS {l:?} × 300 s"),
            infer_rps[l] * 300.0,
            *want,
            five,
        );
    }

    // HTTP error percentage as the document writes it divides each failing series by
    // itself: 100 for every status other than 200 that occurred. The share of failures
    // among all requests needs sums (the dashboard's panel), checked below.
    let error_percentage = by_labels(&answers["HTTP error percentage"]);
    let failing: BTreeSet<&Labels> = rest_delta
        .iter()
        .filter(|(l, _)| l["status_code"] != "200")
        .map(|(l, _)| l)
        .collect();
    assert_eq!(error_percentage.keys().collect::<BTreeSet<_>>(), failing);
    for (l, got) in &error_percentage {
        assert_close(&format!("HTTP error percentage {l:?}"), *got, 100.0, 1e-9);
    }

    // current load: nothing in progress at rest.
    let load = &answers["current load"];
    assert_eq!(load.len(), 1);
    assert_eq!(load[0].value, 0.0, "sum(rest_server_requests_in_progress)");

    // p50/p95/p99 HTTP latency: per series, inside the bucket the workload's observations
    // put it in.
    let duration_count_delta = delta(
        &before,
        &after,
        "rest_server_request_duration_seconds_count",
    );
    for (what, q) in [
        ("p50 HTTP latency", 0.5),
        ("p95 HTTP latency", 0.95),
        ("p99 HTTP latency", 0.99),
    ] {
        let got = by_labels(&answers[what]);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            duration_count_delta.keys().collect::<Vec<_>>(),
            "{what} series"
        );
        for (l, value) in &got {
            let buckets = bucket_deltas(&before, &after, "rest_server_request_duration_seconds", l);
            let (lo, hi) = quantile_band(&buckets, q, tol);
            assert!(
                *value >= lo - 1e-9 && *value <= hi + 1e-9,
                "{what} {l:?}: Prometheus answered {value}, the buckets {buckets:?} give {lo}..{hi}"
            );
        }
    }
    let p95_ok = by_labels(&answers["p95 HTTP latency"])[&rest("POST", INFER, "200")];
    assert!(p95_ok > 0.0 && p95_ok <= 10.0, "p95 of successes {p95_ok}");

    // generation failure percentage: per model.
    let failure_percentage = by_labels(&answers["generation failure percentage"]);
    assert_eq!(
        failure_percentage.keys().collect::<Vec<_>>(),
        failure_delta.keys().collect::<Vec<_>>()
    );
    for (l, failed) in &failure_delta {
        let ok = success_delta.get(l).copied().unwrap_or(0.0);
        assert_close(
            &format!("generation failure percentage {l:?}"),
            failure_percentage[l],
            100.0 * failed / (ok + failed),
            tol,
        );
    }
    let (ok_n, failed_n) = (success_delta[&mv("tiny")], failure_delta[&mv("tiny")]);

    // Queue wait: mean, p95 and the requests that waited more than 2.5 s.
    let mean_wait = answers["mean queue wait"][0].value;
    assert_close("mean queue wait", mean_wait, queue_sum / queue_count, tol);
    assert!(mean_wait > 0.0);
    let queue_buckets = bucket_deltas(&before, &after, "parallel_request_queue", &Labels::new());
    let (lo, hi) = quantile_band(&queue_buckets, 0.95, tol);
    let p95_wait = answers["p95 queue wait"][0].value;
    assert!(
        p95_wait >= lo - 1e-9 && p95_wait <= hi + 1e-9 && p95_wait > 0.0,
        "p95 queue wait {p95_wait}, the buckets {queue_buckets:?} give {lo}..{hi}"
    );
    assert!(
        vector(&prom.query(WAITED_AS_WRITTEN, Some(t))).is_empty(),
        "`{WAITED_AS_WRITTEN}` matched series"
    );
    let inf = labels(&[("le", "+Inf")]);
    let le_2_5 = labels(&[("le", "2.5")]);
    let waited_long = answers["requests that waited more than 2 s"][0].value;
    assert_eq!(
        waited_long,
        after.get("parallel_request_queue_bucket", &inf)
            - after.get("parallel_request_queue_bucket", &le_2_5),
        "requests that waited more than 2.5 s"
    );

    // The dashboard: the document's widgets and panels; every expression parses and
    // returns data.
    let dashboard_path = workspace_root().join("deploy/grafana/sdserve-dashboard.json");
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(&dashboard_path).expect("reading the dashboard"))
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: BTreeSet<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().expect("panel title"))
        .collect();
    for title in DASHBOARD_PANELS {
        assert!(
            titles.contains(title),
            "the dashboard has no panel {title:?}"
        );
    }
    let mut expressions = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let what = format!("dashboard panel {:?}: `{expr}`", panel["title"]);
            let data = prom
                .try_query(expr, Some(t))
                .unwrap_or_else(|e| panic!("{what} failed: {e}"));
            let elements = vector(&data);
            assert!(
                elements.iter().any(|e| e.value.is_finite()),
                "{what} returned no number: {elements:?}"
            );
            expressions += 1;
        }
    }
    assert!(expressions >= DASHBOARD_PANELS.len());
    // The share of failed HTTP requests, from sums.
    let all_requests: f64 = rest_delta.values().sum();
    let failed_requests: f64 = rest_delta
        .iter()
        .filter(|(l, _)| l["status_code"] != "200")
        .map(|(_, v)| v)
        .sum();
    let error_panel = panels
        .iter()
        .find(|p| p["title"] == "HTTP error percentage")
        .expect("HTTP error percentage panel");
    let overall = vector(&prom.query(
        error_panel["targets"][0]["expr"].as_str().expect("expr"),
        Some(t),
    ));
    assert_close(
        "dashboard HTTP error percentage",
        overall[0].value,
        100.0 * failed_requests / all_requests,
        tol,
    );

    // The alert rules, loaded by this Prometheus: healthy, and active exactly where the
    // workload puts them.
    wait_until(
        "the alert rules to be evaluated",
        Duration::from_secs(30),
        || {
            prom.api("/api/v1/rules")["groups"][0]["rules"]
                .as_array()
                .is_some_and(|rules| rules.iter().all(|r| r["health"] == "ok"))
        },
    );
    let rules = prom.api("/api/v1/rules")["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .clone();
    let mean_tiny = sum_delta[&mv("tiny")] / count_delta[&mv("tiny")];
    let mean_nope = sum_delta[&mv("nope")] / count_delta[&mv("nope")];
    let mut expected_active: BTreeMap<&str, BTreeSet<Labels>> = BTreeMap::new();
    let high_latency = expected_active.entry("SdserveHighLatency").or_default();
    for (model, mean) in [("tiny", mean_tiny), ("nope", mean_nope)] {
        if mean > 10.0 {
            high_latency.insert(labels(&[("model", model)]));
        }
    }
    expected_active.insert(
        "SdserveLowAvailability",
        [labels(&[("model", "tiny")]), labels(&[("model", "nope")])].into(),
    );
    assert!(100.0 * ok_n / (ok_n + failed_n) < 95.0);
    expected_active.insert("SdserveQueueOverloaded", BTreeSet::new());
    expected_active.insert(
        "SdserveReadinessErrors",
        [labels(&[("path", READY), ("status_code", "404")])].into(),
    );
    expected_active.insert("SdserveDown", BTreeSet::new());
    expected_active.insert("SdserveModelNotReady", BTreeSet::new());
    let names: BTreeSet<&str> = rules
        .iter()
        .map(|r| r["name"].as_str().expect("rule name"))
        .collect();
    assert_eq!(
        names,
        expected_active.keys().copied().collect(),
        "alerts of alerts.yml"
    );
    for rule in &rules {
        let name = rule["name"].as_str().expect("rule name");
        assert_eq!(rule["type"], "alerting", "{name}");
        assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
        let expr = rule["query"].as_str().expect("rule query");
        let active: BTreeSet<Labels> = vector(&prom.query(expr, Some(t)))
            .into_iter()
            .map(|e| e.labels)
            .collect();
        assert_eq!(active, expected_active[name], "alert {name}: `{expr}`");
    }
    // Rules with a `for` duration are pending, not yet firing.
    wait_until(
        "the active alerts to be pending",
        Duration::from_secs(30),
        || {
            let alerts = prom.api("/api/v1/alerts")["alerts"].clone();
            let pending: BTreeSet<String> = alerts
                .as_array()
                .expect("alerts")
                .iter()
                .filter(|a| a["state"] == "pending")
                .map(|a| {
                    a["labels"]["alertname"]
                        .as_str()
                        .expect("alertname")
                        .to_owned()
                })
                .collect();
            pending
                == expected_active
                    .iter()
                    .filter(|(_, active)| !active.is_empty())
                    .map(|(name, _)| (*name).to_owned())
                    .collect()
        },
    );

    eprintln!(
        "{} document queries, {expressions} dashboard expressions and {} alert rules checked \
         against Prometheus in {:.1} s",
        DOCUMENT_QUERIES.len(),
        rules.len(),
        started.elapsed().as_secs_f64()
    );
}
