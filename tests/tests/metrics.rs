//! The metrics listener against `docs/metrics.md`: exact counter values and label sets after a
//! known sequence of requests, histogram buckets, queue wait, and the settings that move or
//! disable the families.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use sdserve_tests::*;

const INFER: &str = "/v2/models/{model_name}/infer";
const GENERATE: &str = "/v2/models/{model_name}/generate";
const VERSION_INFER: &str = "/v2/models/{model_name}/versions/{model_version}/infer";
const READY: &str = "/v2/models/{model_name}/ready";

/// The seven families of the monitoring document and their types.
const DOCUMENT_FAMILIES: &[(&str, &str)] = &[
    ("model_infer_request_success_total", "counter"),
    ("model_infer_request_failure_total", "counter"),
    ("model_infer_request_duration", "summary"),
    ("parallel_request_queue", "histogram"),
    ("rest_server_requests_total", "counter"),
    ("rest_server_request_duration_seconds", "histogram"),
    ("rest_server_requests_in_progress", "gauge"),
];

/// Labels the platform adds at scrape time; the server must not expose them.
const PLATFORM_LABELS: &[&str] = &[
    "id",
    "instance",
    "name",
    "product_name",
    "product_type",
    "project_id",
];

fn label_keys(s: &Sample) -> Vec<&str> {
    s.labels.keys().map(String::as_str).collect()
}

/// Every series of `name` as (labels → value).
fn series_map(m: &Metrics, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
    m.series(name)
        .into_iter()
        .map(|s| (s.labels.clone().into_iter().collect(), s.value))
        .collect()
}

fn rest_key(method: &str, path: &str, status: &str) -> Vec<(String, String)> {
    vec![
        ("method".into(), method.into()),
        ("path".into(), path.into()),
        ("status_code".into(), status.into()),
    ]
}

/// Structural checks every histogram must pass, whatever its buckets.
fn check_histogram_shape(m: &Metrics, family: &str) {
    for (labels, bounds) in m.bucket_bounds(family) {
        assert_eq!(
            bounds.last().map(String::as_str),
            Some("+Inf"),
            "{family}{labels:?}: last bucket"
        );
        let finite: Vec<f64> = bounds[..bounds.len() - 1]
            .iter()
            .map(|b| b.parse().expect("numeric le"))
            .collect();
        assert!(
            finite.windows(2).all(|w| w[0] < w[1]),
            "{family}{labels:?}: buckets not increasing: {bounds:?}"
        );
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let counts: Vec<f64> = bounds
            .iter()
            .map(|le| {
                let mut with_le = pairs.clone();
                with_le.push(("le", le));
                m.value(&format!("{family}_bucket"), &with_le)
            })
            .collect();
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{family}{labels:?}: buckets not cumulative: {counts:?}"
        );
        assert_eq!(
            counts.last().copied(),
            Some(m.value(&format!("{family}_count"), &pairs)),
            "{family}{labels:?}"
        );
        assert!(
            m.find(&format!("{family}_sum"), &pairs).is_some(),
            "{family}{labels:?} has no _sum"
        );
    }
}

#[test]
fn exact_values_labels_and_buckets_after_a_known_sequence() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.tiny_versioned("ver", "v1");
    let s = launch(&repo).start();
    let ok = prompt_request("a cat", json!({"num_inference_steps": 1}));

    // Before any traffic: the documented families exist, nothing is counted.
    let m = s.scrape_settled();
    for (family, kind) in DOCUMENT_FAMILIES {
        assert_eq!(
            m.types.get(*family).map(String::as_str),
            Some(*kind),
            "TYPE of {family}"
        );
    }
    assert_eq!(m.value("parallel_request_queue_count", &[]), 0.0);
    assert!(
        m.series("rest_server_requests_total").is_empty(),
        "{}",
        m.dump("rest_server_requests_total")
    );

    let started = Instant::now();
    let mut generation_seconds = 0.0;
    for path in [
        "/v2/models/tiny/infer",
        "/v2/models/tiny/infer",
        "/v2/models/tiny/generate",
    ] {
        generation_seconds +=
            s.post(path, &ok).expect(200).json()["parameters"]["generation_seconds"]
                .as_f64()
                .unwrap();
    }
    let tiny_wall = started.elapsed().as_secs_f64();
    s.post("/v2/models/ver/versions/v1/infer", &ok).expect(200);
    s.infer("nope", &ok).expect(404);
    s.post("/v2/models/ver/versions/v9/infer", &ok).expect(404);
    let missing_prompt = json!({"inputs": [{"name": "negative_prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}]});
    s.infer("tiny", &missing_prompt).expect(400);
    s.post_bytes("/v2/models/tiny/infer", b"{\"inputs\": [".to_vec())
        .expect(422);
    s.get("/v2/models/tiny/ready").expect(200);
    s.get("/v2/models/tiny/ready").expect(200);
    s.get("/v2/models/nope/ready").expect(404);
    s.get("/v2").expect(200);
    // Not counted: health routes and paths that match no route.
    for _ in 0..3 {
        s.get("/v2/health/ready").expect(200);
        s.get("/v2/health/live").expect(200);
    }
    s.get("/v2/no/such/route").expect(404);

    let m = s.scrape_settled();

    // Model families: labels `model` and `version` ("None" when the URL names no version).
    let mv = |model: &'static str, version: &'static str| [("model", model), ("version", version)];
    assert_eq!(
        m.value("model_infer_request_success_total", &mv("tiny", "None")),
        3.0
    );
    assert_eq!(
        m.value("model_infer_request_failure_total", &mv("tiny", "None")),
        2.0
    );
    assert_eq!(
        m.value("model_infer_request_success_total", &mv("ver", "v1")),
        1.0
    );
    assert_eq!(
        m.find("model_infer_request_failure_total", &mv("ver", "v1"))
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        m.value("model_infer_request_failure_total", &mv("nope", "None")),
        1.0
    );
    assert_eq!(
        m.value("model_infer_request_failure_total", &mv("ver", "v9")),
        1.0
    );
    for (model, version) in [("nope", "None"), ("ver", "v9")] {
        assert_eq!(
            m.find("model_infer_request_success_total", &mv(model, version))
                .unwrap_or(0.0),
            0.0
        );
    }
    let counts = series_map(&m, "model_infer_request_duration_count");
    let expected: BTreeMap<Vec<(String, String)>, f64> = [
        ("tiny", "None", 5.0),
        ("ver", "v1", 1.0),
        ("nope", "None", 1.0),
        ("ver", "v9", 1.0),
    ]
    .into_iter()
    .map(|(model, version, n)| {
        (
            vec![
                ("model".into(), model.into()),
                ("version".into(), version.into()),
            ],
            n,
        )
    })
    .collect();
    assert_eq!(
        counts, expected,
        "model_infer_request_duration_count series"
    );
    // Queue wait plus generation of the successes; never more than the requests' wall time.
    let tiny_sum = m.value("model_infer_request_duration_sum", &mv("tiny", "None"));
    assert!(
        tiny_sum >= generation_seconds - 0.01,
        "duration sum {tiny_sum} < generation time {generation_seconds}"
    );
    assert!(
        tiny_sum <= tiny_wall + 0.5,
        "duration sum {tiny_sum} > wall time {tiny_wall}"
    );
    for name in [
        "model_infer_request_success_total",
        "model_infer_request_failure_total",
        "model_infer_request_duration_sum",
    ] {
        for sample in m.series(name) {
            assert_eq!(label_keys(sample), ["model", "version"], "{name}");
            assert!(
                expected.contains_key(&sample.labels.clone().into_iter().collect::<Vec<_>>()),
                "unexpected series {sample:?}"
            );
        }
    }

    // REST families: route templates, health and unmatched paths absent, exact counts.
    let rest: BTreeMap<_, _> = [
        (rest_key("POST", INFER, "200"), 2.0),
        (rest_key("POST", GENERATE, "200"), 1.0),
        (rest_key("POST", VERSION_INFER, "200"), 1.0),
        (rest_key("POST", INFER, "404"), 1.0),
        (rest_key("POST", VERSION_INFER, "404"), 1.0),
        (rest_key("POST", INFER, "400"), 1.0),
        (rest_key("POST", INFER, "422"), 1.0),
        (rest_key("GET", READY, "200"), 2.0),
        (rest_key("GET", READY, "404"), 1.0),
        (rest_key("GET", "/v2", "200"), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        series_map(&m, "rest_server_requests_total"),
        rest,
        "rest_server_requests_total"
    );
    assert_eq!(
        series_map(&m, "rest_server_request_duration_seconds_count"),
        rest,
        "rest_server_request_duration_seconds_count"
    );
    let in_progress = series_map(&m, "rest_server_requests_in_progress");
    assert_eq!(
        in_progress,
        [
            (vec![("method".to_string(), "GET".to_string())], 0.0),
            (vec![("method".to_string(), "POST".to_string())], 0.0)
        ]
        .into_iter()
        .collect(),
        "rest_server_requests_in_progress"
    );

    // Only the successes were queued.
    assert_eq!(m.value("parallel_request_queue_count", &[]), 4.0);
    assert_eq!(
        m.value("parallel_request_queue_bucket", &[("le", "+Inf")]),
        4.0
    );

    // Buckets: the documented histograms use exactly the documented boundaries, printed as
    // Python prints floats.
    for family in [
        "parallel_request_queue",
        "rest_server_request_duration_seconds",
    ] {
        let bounds = m.bucket_bounds(family);
        assert!(!bounds.is_empty(), "{family} has no series");
        for (labels, les) in bounds {
            assert_eq!(les, DOCUMENT_BUCKETS, "{family}{labels:?}");
        }
    }
    for family in m.families_of_type("histogram") {
        check_histogram_shape(&m, &family);
    }
    assert_eq!(
        m.bucket_bounds("parallel_request_queue")
            .into_keys()
            .collect::<Vec<_>>(),
        vec![BTreeMap::new()],
        "parallel_request_queue has no labels"
    );

    // Nothing but the documented families, MLServer's gRPC ones (with its buckets) and our
    // own under `sdserve_`; no platform labels.
    for family in m.types.keys() {
        assert!(
            DOCUMENT_FAMILIES.iter().any(|(f, _)| f == family)
                || family.starts_with("grpc_server_")
                || family.starts_with("sdserve_"),
            "family {family} is neither documented, MLServer's gRPC one nor under the sdserve_ prefix"
        );
        if family.starts_with("grpc_server_") && m.types[family] == "histogram" {
            for (labels, les) in m.bucket_bounds(family) {
                assert_eq!(les, DOCUMENT_BUCKETS, "{family}{labels:?}");
            }
        }
    }
    for sample in &m.samples {
        for l in PLATFORM_LABELS {
            assert!(
                !sample.labels.contains_key(*l),
                "{sample:?} carries the platform label {l}"
            );
        }
    }
    // Our extras named by the issue.
    assert_eq!(
        m.types.get("sdserve_queue_depth").map(String::as_str),
        Some("gauge")
    );
    assert_eq!(m.value("sdserve_queue_depth", &[]), 0.0);
    assert_eq!(
        m.value("sdserve_images_generated_total", &[("model", "tiny")]),
        3.0
    );
    assert_eq!(
        m.value("sdserve_images_generated_total", &[("model", "ver")]),
        1.0
    );
    assert!(
        m.value(
            "sdserve_model_load_seconds",
            &[("model", "tiny"), ("version", "")]
        ) > 0.0
    );
    let generation = m.bucket_bounds("sdserve_generation_seconds");
    let les = generation
        .get(&BTreeMap::from([("model".to_string(), "tiny".to_string())]))
        .expect("generation histogram");
    let largest: f64 = les[les.len() - 2].parse().unwrap();
    assert!(
        largest >= 300.0,
        "generation buckets should reach several minutes, end at {largest}"
    );
    assert_eq!(
        m.value("sdserve_generation_seconds_count", &[("model", "tiny")]),
        3.0
    );
}

#[test]
fn queue_wait_grows_when_requests_wait_for_the_worker() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).args(["--parallel-workers", "1"]).start();
    let before = s.scrape_settled();
    assert_eq!(before.value("parallel_request_queue_sum", &[]), 0.0);
    assert_eq!(before.value("parallel_request_queue_count", &[]), 0.0);

    // Long enough that the three overlap on one worker.
    let body = prompt_request("a slow cat", json!({"num_inference_steps": 40}));
    let barrier = Barrier::new(4);
    let (replies, max_in_progress, max_depth) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    s.infer("tiny", &body)
                })
            })
            .collect();
        barrier.wait();
        let (mut max_in_progress, mut max_depth) = (0.0f64, 0.0f64);
        while !handles.iter().all(|h| h.is_finished()) {
            let m = s.scrape();
            max_in_progress = max_in_progress.max(
                m.find("rest_server_requests_in_progress", &[("method", "POST")])
                    .unwrap_or(0.0),
            );
            max_depth = max_depth.max(m.value("sdserve_queue_depth", &[]));
            std::thread::sleep(Duration::from_millis(20));
        }
        let replies: Vec<Reply> = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        (replies, max_in_progress, max_depth)
    });
    let mut reported_wait = Vec::new();
    for r in &replies {
        let v = r.expect(200).json();
        reported_wait.push(
            v["parameters"]["queue_seconds"]
                .as_f64()
                .expect("queue_seconds"),
        );
    }
    assert_eq!(max_in_progress, 3.0, "three requests in progress at once");
    assert!(
        max_depth >= 1.0,
        "the queue depth gauge never showed a waiting request"
    );

    let m = s.scrape_settled();
    let sum = m.value("parallel_request_queue_sum", &[]);
    assert_eq!(m.value("parallel_request_queue_count", &[]), 3.0);
    assert!(
        (sum - reported_wait.iter().sum::<f64>()).abs() < 0.01,
        "queue sum {sum} differs from the waits reported to clients {reported_wait:?}"
    );
    reported_wait.sort_by(f64::total_cmp);
    let generation = m.value("sdserve_generation_seconds_sum", &[("model", "tiny")]) / 3.0;
    // One worker: the second waited about one generation, the third about two.
    assert!(
        reported_wait[1] > 0.5 * generation,
        "waits {reported_wait:?}, generation {generation}"
    );
    assert!(
        reported_wait[2] > 1.5 * generation,
        "waits {reported_wait:?}, generation {generation}"
    );
    assert!(
        sum > 2.0 * generation,
        "queue sum {sum}, generation {generation}"
    );
    assert!(
        m.value("parallel_request_queue_bucket", &[("le", "0.005")]) <= 1.0,
        "at most one request did not wait"
    );
    // The model duration covers the queue wait.
    assert!(
        m.value(
            "model_infer_request_duration_sum",
            &[("model", "tiny"), ("version", "None")]
        ) >= sum
    );
}

#[test]
fn null_metrics_endpoint_disables_the_listener() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let port = free_port();
    repo.settings(json!({"metrics_endpoint": null, "metrics_port": port}));
    let s = launch(&repo).no_metrics_port_flag().start();
    s.infer(
        "tiny",
        &prompt_request("a cat", json!({"num_inference_steps": 1})),
    )
    .expect(200);
    assert!(
        !s.has_metrics_listener(),
        "log announces a metrics listener:\n{}",
        s.log()
    );
    let refused = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(2),
    );
    assert!(
        refused.is_err(),
        "something listens on the disabled metrics port {port}"
    );

    // The same settings with a port and no null: the listener is there.
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"metrics_port": port}));
    let s = launch(&repo).no_metrics_port_flag().start();
    assert_eq!(s.metrics_port(), port);
    s.scrape();
}

#[test]
fn rest_prefix_and_endpoint_settings() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .env("MLSERVER_METRICS_REST_SERVER_PREFIX", "myprefix")
        .args(["--metrics-endpoint", "/prom"])
        .start();
    s.get("/v2/models/tiny/ready").expect(200);
    s.infer(
        "tiny",
        &prompt_request("a cat", json!({"num_inference_steps": 1})),
    )
    .expect(200);

    let m = s.scrape_path("/prom");
    assert_eq!(
        m.value(
            "myprefix_requests_total",
            &[("method", "GET"), ("path", READY), ("status_code", "200")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "myprefix_requests_total",
            &[("method", "POST"), ("path", INFER), ("status_code", "200")]
        ),
        1.0
    );
    for (family, kind) in [
        ("myprefix_requests_total", "counter"),
        ("myprefix_request_duration_seconds", "histogram"),
        ("myprefix_requests_in_progress", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    for (_, les) in m.bucket_bounds("myprefix_request_duration_seconds") {
        assert_eq!(les, DOCUMENT_BUCKETS);
    }
    let rest_server: BTreeSet<&String> = m
        .types
        .keys()
        .filter(|f| f.starts_with("rest_server"))
        .collect();
    assert!(rest_server.is_empty(), "prefix ignored for {rest_server:?}");
    // The prefix renames only the REST families.
    assert_eq!(
        m.value(
            "model_infer_request_success_total",
            &[("model", "tiny"), ("version", "None")]
        ),
        1.0
    );

    let r = client()
        .get(format!("http://127.0.0.1:{}/metrics", s.metrics_port()))
        .send()
        .expect("GET /metrics");
    assert_eq!(
        r.status(),
        404,
        "the default path answers when the endpoint moved"
    );
}
