//! Settings as MLServer reads them: `MLSERVER_*` variables, `settings.json` over them, flags
//! over both, a model from `MLSERVER_MODEL_*` only, startup failures and unknown-key warnings.

use std::net::TcpStream;
use std::time::Duration;

use sdserve_tests::*;

fn nothing_listens_on(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_err()
}

/// `parallel_workers + max_queue_size`, as the server reports it.
fn capacity(s: &Server) -> f64 {
    s.scrape().value("sdserve_queue_capacity", &[])
}

#[test]
fn mlserver_variables_change_behaviour() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let (http, metrics) = (free_port(), free_port());
    let s = launch(&repo)
        .no_http_port_flag()
        .no_metrics_port_flag()
        .env("MLSERVER_HTTP_PORT", http.to_string())
        .env("MLSERVER_METRICS_PORT", metrics.to_string())
        .env("MLSERVER_SERVER_NAME", "from-env")
        .env("MLSERVER_PARALLEL_WORKERS", "2")
        .env("MLSERVER_MAX_QUEUE_SIZE", "3")
        .start();
    assert_eq!(s.http_port, http);
    assert_eq!(s.metrics_port(), metrics);
    assert_eq!(s.get("/v2").expect(200).json()["name"], "from-env");
    let r = s.infer(
        "tiny",
        &prompt_request("a cat", json!({"num_inference_steps": 1})),
    );
    assert_eq!(
        r.expect(200).header("ce-inferenceservicename").as_deref(),
        Some("from-env")
    );
    assert_eq!(capacity(&s), 5.0);
}

#[test]
fn settings_json_beats_variables() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let (file_http, file_metrics, env_http, env_metrics) =
        (free_port(), free_port(), free_port(), free_port());
    repo.settings(json!({
        "http_port": file_http, "metrics_port": file_metrics, "server_name": "from-file", "max_queue_size": 7
    }));
    let s = launch(&repo)
        .no_http_port_flag()
        .no_metrics_port_flag()
        .env("MLSERVER_HTTP_PORT", env_http.to_string())
        .env("MLSERVER_METRICS_PORT", env_metrics.to_string())
        .env("MLSERVER_SERVER_NAME", "from-env")
        .env("MLSERVER_MAX_QUEUE_SIZE", "2")
        .start();
    assert_eq!(s.http_port, file_http);
    assert_eq!(s.metrics_port(), file_metrics);
    assert_eq!(s.get("/v2").expect(200).json()["name"], "from-file");
    assert_eq!(capacity(&s), 8.0);
    assert!(nothing_listens_on(env_http) && nothing_listens_on(env_metrics));
}

#[test]
fn flags_beat_settings_json() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let file_http = free_port();
    repo.settings(json!({"http_port": file_http, "max_queue_size": 7, "server_name": "from-file"}));
    // The harness passes --http-port 0.
    let s = launch(&repo)
        .args(["--max-queue-size", "3"])
        .env("MLSERVER_MAX_QUEUE_SIZE", "2")
        .start();
    assert_ne!(s.http_port, file_http);
    assert!(nothing_listens_on(file_http));
    assert_eq!(capacity(&s), 4.0);
    assert_eq!(
        s.get("/v2").expect(200).json()["name"],
        "from-file",
        "keys without a flag still come from the file"
    );
}

#[test]
fn a_model_from_mlserver_model_variables() {
    let model_env = |l: Launch| {
        l.env("MLSERVER_MODEL_NAME", "envsd")
            .env("MLSERVER_MODEL_IMPLEMENTATION", BUILTIN)
            .env("MLSERVER_MODEL_URI", tiny_model().to_string_lossy())
            .env("MLSERVER_MODEL_VERSION", "3")
            .env(
                "MLSERVER_MODEL_EXTRA",
                r#"{"defaults": {"num_inference_steps": 1}}"#,
            )
    };

    // An empty repository: the model comes from the variables alone.
    let empty = Repo::new();
    let s = model_env(launch(&empty)).start();
    s.get("/v2/models/envsd/versions/3/ready").expect(200);
    let v = s
        .infer("envsd", &prompt_request("a cat", json!({})))
        .expect(200)
        .json();
    assert_eq!(v["model_version"], "3");
    assert_eq!(
        v["parameters"]["num_inference_steps"], 1,
        "MLSERVER_MODEL_EXTRA gives the default steps"
    );
    assert_eq!(image_sizes(&v), vec![(64, 64)]);
    assert_eq!(
        s.post("/v2/repository/index", &json!({}))
            .expect(200)
            .json(),
        json!([{"name": "envsd", "version": "3", "state": "READY", "reason": ""}])
    );

    // With a model-settings.json in the repository the variables describe no extra model.
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = model_env(launch(&repo)).start();
    s.get("/v2/models/tiny/ready").expect(200);
    assert_eq!(
        s.get("/v2/models/envsd/ready").expect(404).json(),
        json!({"error": "Model envsd not found"})
    );
}

#[test]
fn a_model_that_cannot_load_stops_the_server() {
    // Weights that are not safetensors, in a linked copy of the tiny model.
    let repo = Repo::new();
    let copy = repo.linked_tiny("copy");
    let weights = copy
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&weights).expect("removing the link");
    std::fs::write(&weights, b"these are not weights").expect("writing broken weights");
    let mut settings = tiny_settings("broken", None);
    settings["parameters"]["uri"] = json!(copy);
    let file = repo.model("broken", settings);
    let exit = launch(&repo).run_to_exit(START_TIMEOUT);
    assert!(
        !exit.stderr.contains('\u{1b}'),
        "terminal escape codes in a piped log:\n{}",
        exit.stderr
    );
    assert!(
        !exit.status.success(),
        "sdserve exited with {}",
        exit.status
    );
    for needle in [
        "broken".to_string(),
        file.display().to_string(),
        weights.display().to_string(),
        "safetensors".into(),
    ] {
        assert!(
            exit.stderr.contains(&needle),
            "stderr does not name {needle:?}:\n{}",
            exit.stderr
        );
    }
    // The failure is logged once, with the model, the stage and the cause.
    let logged: Vec<&str> = exit
        .stderr
        .lines()
        .filter(|l| l.contains("model failed to load"))
        .collect();
    assert_eq!(logged.len(), 1, "{}", exit.stderr);
    for needle in ["broken", "stage=load", "safetensors"] {
        assert!(
            logged[0].contains(needle),
            "{needle:?} not in {:?}",
            logged[0]
        );
    }

    // A uri that does not exist.
    let repo = Repo::new();
    let missing = repo.assets().join("no-such-model");
    let mut settings = tiny_settings("lost", None);
    settings["parameters"]["uri"] = json!(missing);
    let file = repo.model("lost", settings);
    let exit = launch(&repo).run_to_exit(START_TIMEOUT);
    assert!(
        !exit.status.success(),
        "sdserve exited with {}",
        exit.status
    );
    for needle in [
        "lost".to_string(),
        file.display().to_string(),
        missing.display().to_string(),
    ] {
        assert!(
            exit.stderr.contains(&needle),
            "stderr does not name {needle:?}:\n{}",
            exit.stderr
        );
    }
}

#[test]
fn invalid_settings_stop_the_server_with_a_clear_message() {
    let repo = Repo::new();
    let file = repo.model(
        "hf",
        json!({"name": "hf", "implementation": "mlserver_huggingface.HuggingFaceRuntime"}),
    );
    let exit = launch(&repo).run_to_exit(Duration::from_secs(30));
    assert!(!exit.status.success());
    for needle in [
        file.display().to_string(),
        "mlserver_huggingface.HuggingFaceRuntime".into(),
        BUILTIN.into(),
    ] {
        assert!(
            exit.stderr.contains(&needle),
            "stderr does not name {needle:?}:\n{}",
            exit.stderr
        );
    }

    let repo = Repo::new();
    repo.tiny("tiny");
    let file = repo.settings(json!({"http_port": "eighty"}));
    let exit = launch(&repo)
        .no_http_port_flag()
        .run_to_exit(Duration::from_secs(30));
    assert!(!exit.status.success());
    for needle in [
        file.display().to_string(),
        "http_port".into(),
        "eighty".into(),
    ] {
        assert!(
            exit.stderr.contains(&needle),
            "stderr does not name {needle:?}:\n{}",
            exit.stderr
        );
    }
}

#[test]
fn unknown_keys_are_warned_about_by_name() {
    let repo = Repo::new();
    let settings_file = repo.settings(json!({"htp_port": 9999}));
    let mut model = tiny_settings("tiny", None);
    model["max_batch_szie"] = json!(3);
    let model_file = repo.model("tiny", model);
    let s = launch(&repo).start();
    let log = s.log();
    assert!(
        !log.contains('\u{1b}'),
        "terminal escape codes in a piped log:\n{log}"
    );
    for (file, key) in [
        (&settings_file, "htp_port"),
        (&model_file, "max_batch_szie"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("`{key}`")))
            .unwrap_or_else(|| panic!("no line names {key}:\n{log}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&file.display().to_string()), "{line}");
    }
    // Ignored, not applied: the server still serves.
    s.infer(
        "tiny",
        &prompt_request("a cat", json!({"num_inference_steps": 1})),
    )
    .expect(200);
}
