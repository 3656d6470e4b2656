//! The manifests of `deploy/kubernetes`: every one passes a validator that knows the Kubernetes
//! schemas and the KServe, KEDA and Prometheus Operator fields they use (and that validator
//! refuses broken copies), and their ports, probes, metrics path, grace period and variables are
//! the server's own: changing a default without the manifests fails here.

use std::path::Path;

use sdserve_settings::ServerSettings;
use sdserve_tests::*;

const RUNTIME: &str = "kserve/cluster-serving-runtime.yaml";
const ISVC: &str = "kserve/inference-service.yaml";
const DEPLOYMENT: &str = "plain/deployment.yaml";

#[test]
fn every_manifest_validates_and_broken_copies_do_not() {
    let exit = validate_manifests(&["deploy/kubernetes"]);
    assert!(exit.status.success(), "{}{}", exit.stdout, exit.stderr);
    let files = std::fs::read_dir(workspace_root().join("deploy/kubernetes"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).into_iter().flatten())
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "yaml")
        })
        .count();
    let passed = exit.stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        files >= 8 && passed == files,
        "{passed} of {files}:\n{}",
        exit.stdout
    );

    // Each broken copy fails, naming what is wrong.
    let dir = tempfile::tempdir().unwrap();
    let broken = [
        (
            DEPLOYMENT,
            "livenessProbe:",
            "livenesProbe:",
            "'livenesProbe' was unexpected",
        ),
        (
            RUNTIME,
            "readOnlyRootFilesystem",
            "readOnlyRootFileSystem",
            "'readOnlyRootFileSystem'",
        ),
        (
            RUNTIME,
            "name: kserve-container",
            "name: server",
            "does not contain items",
        ),
        (
            ISVC,
            "type: Value",
            "type: AverageValue",
            "'Value' was expected",
        ),
        (
            ISVC,
            "storageUri: s3://",
            "storageUri: ftp://",
            "does not match",
        ),
        (
            "plain/scaled-object.yaml",
            "threshold: \"2\"",
            "threshold: two",
            "'two' does not match",
        ),
        (
            "plain/pod-monitor.yaml",
            "podMetricsEndpoints",
            "podMetricEndpoints",
            "was unexpected",
        ),
        (
            "plain/service.yaml",
            "targetPort: http",
            "targetPort: [http]",
            "is not valid",
        ),
    ];
    for (file, from, to, message) in broken {
        let text =
            std::fs::read_to_string(workspace_root().join("deploy/kubernetes").join(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        let copy = dir.path().join(Path::new(file).file_name().unwrap());
        std::fs::write(&copy, text.replacen(from, to, 1)).unwrap();
        let exit = validate_manifests(&[copy.to_str().unwrap()]);
        assert!(
            !exit.status.success(),
            "{file} with {to:?} passed:\n{}",
            exit.stdout
        );
        assert!(
            exit.stdout.contains(message),
            "{file} with {to:?}:\n{}",
            exit.stdout
        );
    }
}

/// A container's port of `name`.
fn port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name} in {}", container["name"]))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// The probes, ports, variables and security of a serving container, against `defaults`;
/// `pod_security`: the pod's security context, if the manifest has one.
fn check_container(c: &Value, pod_security: &Value, d: &ServerSettings, known_variables: &str) {
    let name = &c["name"];
    // `command` replaces the image's CMD; the images of docker/ put sdserve on PATH.
    assert_eq!(c["command"], json!(["sdserve"]), "{name}");
    assert_eq!(c["args"], json!(["start", "/mnt/models"]), "{name}");
    for dockerfile in ["docker/Dockerfile", "docker/Dockerfile.cpu"] {
        let text = std::fs::read_to_string(workspace_root().join(dockerfile)).unwrap();
        assert!(
            text.contains(" /usr/local/bin/sdserve\n") && text.contains("USER 1001"),
            "{dockerfile} installs /usr/local/bin/sdserve and runs as uid 1001"
        );
    }
    let uid = [&c["securityContext"], pod_security]
        .iter()
        .find_map(|s| s["runAsUser"].as_u64());
    assert_eq!(uid, Some(1001), "{name}: the images' user");
    let mounts = c["volumeMounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/tmp"),
        "{name}: a writable /tmp on the read-only root filesystem"
    );
    assert!(
        env(c, "CUDA_CACHE_PATH").is_some_and(|p| p.starts_with("/tmp/")),
        "{name}"
    );
    let ports = [
        ("http", "MLSERVER_HTTP_PORT", d.http_port),
        ("grpc", "MLSERVER_GRPC_PORT", d.grpc_port),
        ("metrics", "MLSERVER_METRICS_PORT", d.metrics_port),
    ];
    for (port_name, variable, default) in ports {
        assert_eq!(
            port(c, port_name),
            u64::from(default),
            "{name}: port {port_name}"
        );
        assert_eq!(
            env(c, variable),
            Some(default.to_string().as_str()),
            "{name}: {variable}"
        );
    }
    for e in c["env"].as_array().unwrap() {
        let var = e["name"].as_str().unwrap();
        if var.starts_with("MLSERVER_") {
            assert!(
                known_variables.contains(&format!("`{var}`")),
                "{name}: {var} is not one of sdserve's settings"
            );
        }
    }
    let probes = [
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ];
    for (probe, path) in probes {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{name}: {probe}");
        let p = &get["port"];
        assert!(
            *p == json!("http") || *p == json!(d.http_port),
            "{name}: {probe} on port {p}"
        );
    }
    // The startup probe covers a model load of several minutes.
    let startup = &c["startupProbe"];
    let allowed =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(
        allowed >= 300,
        "{name}: the startup probe allows only {allowed} s"
    );
    let security = &c["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1", "{name}");
}

/// The grace period outlasts the preStop pause and sdserve's drain.
fn check_grace(grace: &Value, container: &Value, d: &ServerSettings, what: &str) {
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_f64()
        .unwrap_or(0.0);
    let grace = grace
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no terminationGracePeriodSeconds"));
    assert!(
        grace > pause + d.drain_timeout,
        "{what}: a grace period of {grace} s does not outlast {pause} s of preStop and the {} s drain",
        d.drain_timeout
    );
}

#[test]
fn the_manifests_use_the_servers_ports_probes_and_drain() {
    let all = kubernetes_manifests();
    let d = ServerSettings::default();
    let metrics_path = d
        .metrics_endpoint
        .clone()
        .expect("a default metrics endpoint");
    let settings = run_command(
        std::process::Command::new(sdserve_bin()).arg("settings"),
        std::time::Duration::from_secs(30),
    )
    .stdout;

    // Without KServe.
    let deployment = manifest(&all, DEPLOYMENT, "Deployment");
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    check_container(container, &pod["spec"]["securityContext"], &d, &settings);
    check_grace(
        &pod["spec"]["terminationGracePeriodSeconds"],
        container,
        &d,
        DEPLOYMENT,
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"],
        d.metrics_port.to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], metrics_path);
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/mnt/models" && m["readOnly"] == true)
    );

    let service = manifest(&all, "plain/service.yaml", "Service");
    let http = &service["spec"]["ports"][0];
    assert_eq!(
        (&http["port"], &http["targetPort"]),
        (&json!(d.http_port), &json!("http"))
    );
    let monitor = manifest(&all, "plain/pod-monitor.yaml", "PodMonitor");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["path"]),
        (&json!("metrics"), &json!(metrics_path))
    );
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    for other in [
        &monitor["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"],
        &manifest(
            &all,
            "plain/pod-disruption-budget.yaml",
            "PodDisruptionBudget",
        )["spec"]["selector"]["matchLabels"],
    ] {
        assert_eq!(
            other, selector,
            "every selector finds the Deployment's pods"
        );
    }
    let scaled = manifest(&all, "plain/scaled-object.yaml", "ScaledObject");
    let name = deployment["metadata"]["name"].as_str().unwrap();
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], name);
    // The Deployment's pods are named after it: the query selects them by that name.
    let query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    assert!(query.contains(&format!("pod=~\"{name}-.*\"")), "{query}");

    // KServe.
    let runtime = manifest(&all, RUNTIME, "ClusterServingRuntime");
    let container = runtime["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kserve-container")
        .expect("the kserve-container");
    check_container(container, &Value::Null, &d, &settings);
    assert_eq!(env(container, "MLSERVER_MODEL_NAME"), Some("{{.Name}}"));
    let volumes = runtime["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "tmp" && v.get("emptyDir").is_some())
    );
    let annotations = &runtime["spec"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"],
        d.metrics_port.to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], metrics_path);
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let isvc = manifest(&all, ISVC, "InferenceService");
    let predictor = &isvc["spec"]["predictor"];
    check_grace(
        &predictor["terminationGracePeriodSeconds"],
        container,
        &d,
        ISVC,
    );
    assert_eq!(predictor["model"]["runtime"], runtime["metadata"]["name"]);
    assert_eq!(
        predictor["model"]["modelFormat"]["name"],
        runtime["spec"]["supportedModelFormats"][0]["name"]
    );
    let annotations = &isvc["metadata"]["annotations"];
    assert_eq!(annotations["serving.kserve.io/autoscalerClass"], "keda");
    // KServe's own scraping setup would point prometheus.io/port at a queue-proxy port.
    assert_eq!(
        annotations["serving.kserve.io/enable-prometheus-scraping"],
        "false"
    );
    // KServe labels the predictor pods with the InferenceService's name and names them
    // `<name>-predictor-…`: the PodMonitor and the query find them so.
    let name = isvc["metadata"]["name"].as_str().unwrap();
    let monitor = manifest(&all, "kserve/pod-monitor.yaml", "PodMonitor");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["serving.kserve.io/inferenceservice"],
        name
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["path"]),
        (&json!("metrics"), &json!(metrics_path))
    );
    let query = predictor["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
        .as_str()
        .unwrap();
    assert!(
        query.contains(&format!("pod=~\"{name}-predictor-.*\"")),
        "{query}"
    );
}
