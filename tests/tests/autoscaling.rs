//! The autoscaling queries of `deploy/kubernetes` (KEDA's ScaledObject and KServe's
//! InferenceService), read from the manifests and run unchanged against a real Prometheus that
//! scrapes sdserve while a workload holds requests running and queued: each returns the number
//! of requests queued plus running.

use std::time::Duration;

use sdserve_tests::*;

/// A scrape job of the same server per entry of `workloads`, each with the `namespace` and
/// `pod` labels Prometheus gives a pod's samples (through a PodMonitor or pod annotations), the
/// pod named as Kubernetes names the pods of the workload (a Deployment, or KServe's predictor).
fn scrape_config(metrics_port: u16, namespace: &str, workloads: &[&str]) -> String {
    let jobs: String = workloads
        .iter()
        .enumerate()
        .map(|(i, workload)| {
            format!(
                "  - job_name: job{i}\n    metrics_path: /metrics\n    static_configs:\n      \
                 - targets: [\"127.0.0.1:{metrics_port}\"]\n        \
                 labels: {{namespace: {namespace}, pod: {workload}-7c9d5f6b8-x2x4q}}\n"
            )
        })
        .collect();
    format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
}

/// The single number an instant query returns, or `None` while it returns nothing.
fn scalar(prom: &Prometheus, query: &str) -> Option<f64> {
    let data = prom.query(query, None);
    let result = data["result"].as_array()?;
    assert!(result.len() <= 1, "{query} returned several series: {data}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[test]
fn the_autoscaling_queries_count_queued_and_running_requests() {
    let all = kubernetes_manifests();
    let scaled = manifest(&all, "plain/scaled-object.yaml", "ScaledObject");
    let keda = scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .expect("the ScaledObject's query")
        .to_owned();
    let isvc = manifest(&all, "kserve/inference-service.yaml", "InferenceService");
    let kserve =
        isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
            .as_str()
            .expect("the InferenceService's query")
            .to_owned();
    let namespace = scaled["metadata"]["namespace"].as_str().unwrap();
    assert_eq!(isvc["metadata"]["namespace"], namespace);
    let deployment = scaled["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
    let predictor = format!("{}-predictor", isvc["metadata"]["name"].as_str().unwrap());

    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "4"])
        .start();
    // Each pod scraped twice, as by its PodMonitor and by its annotations: counted once.
    let workloads = [deployment, deployment, &predictor, &predictor];
    let config = scrape_config(s.metrics_port(), namespace, &workloads);
    let prom = Prometheus::start(&config, &[]);
    let both_equal = |want: f64| {
        [&keda, &kserve]
            .iter()
            .all(|q| scalar(&prom, q) == Some(want))
    };
    let scrape_wait = Duration::from_secs(30);
    wait_until("both queries to return 0 when idle", scrape_wait, || {
        both_equal(0.0)
    });

    let long = held_generation(&s, None);
    wait_until("the long request to run", START_TIMEOUT, || {
        s.gauge("sdserve_requests_running") == 1.0
    });
    std::thread::scope(|scope| {
        let queued: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    s.infer(
                        "tiny",
                        &prompt_request("a square", json!({"num_inference_steps": 1})),
                    )
                })
            })
            .collect();
        wait_until("two requests queued behind it", START_TIMEOUT, || {
            s.gauge("sdserve_queue_depth") == 2.0
        });
        wait_until(
            "both queries to return 1 running + 2 queued",
            scrape_wait,
            || both_equal(3.0),
        );
        println!("queued + running = 3: {keda}\n{kserve}");
        // Hanging up cancels the long generation; the queued requests then run.
        drop(long);
        for q in queued {
            q.join().expect("client thread").expect(200);
        }
    });
    wait_until("both queries back to 0", scrape_wait, || both_equal(0.0));
}
