//! Model lifecycle over HTTP: the repository API (index, load, unload), a model that is still
//! loading, and models loaded only on demand.

use sdserve_tests::*;

fn assert_empty(r: &Reply, status: u16) {
    r.expect(status);
    assert!(
        r.raw.is_empty(),
        "expected an empty {status} body, got {:?}",
        r.text()
    );
}

fn index(s: &Server, body: Value) -> Value {
    s.post("/v2/repository/index", &body).expect(200).json()
}

#[test]
fn index_unload_and_load() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.tiny_versioned("ver", "v1");
    let s = launch(&repo).start();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1}));

    let both_ready = json!([
        {"name": "tiny", "state": "READY", "reason": ""},
        {"name": "ver", "version": "v1", "state": "READY", "reason": ""}
    ]);
    assert_eq!(index(&s, json!({})), both_ready);
    assert_eq!(index(&s, json!({"ready": true})), both_ready);
    let r = s.post_bytes("/v2/repository/index", Vec::new());
    r.expect(422);
    assert!(r.json()["detail"].is_array(), "{}", r.text());

    assert_empty(
        &s.post("/v2/repository/models/tiny/unload", &json!({})),
        200,
    );
    let again = s.post("/v2/repository/models/tiny/unload", &json!({}));
    again.expect(404);
    assert_eq!(again.json(), json!({"error": "Model tiny not found"}));

    // Unloaded: gone from the registry (404, as MLServer), listed as UNAVAILABLE.
    for r in [
        s.infer("tiny", &body),
        s.get("/v2/models/tiny/ready"),
        s.get("/v2/models/tiny"),
    ] {
        r.expect(404);
        assert_eq!(r.json(), json!({"error": "Model tiny not found"}));
    }
    assert_eq!(
        index(&s, json!({})),
        json!([
            {"name": "tiny", "state": "UNAVAILABLE", "reason": ""},
            {"name": "ver", "version": "v1", "state": "READY", "reason": ""}
        ])
    );
    assert_eq!(
        index(&s, json!({"ready": true})),
        json!([{"name": "ver", "version": "v1", "state": "READY", "reason": ""}])
    );
    assert_empty(&s.get("/v2/health/ready"), 200);
    s.post("/v2/models/ver/versions/v1/infer", &body)
        .expect(200);

    assert_empty(&s.post("/v2/repository/models/tiny/load", &json!({})), 200);
    assert_eq!(index(&s, json!({})), both_ready);
    assert_empty(&s.get("/v2/models/tiny/ready"), 200);
    assert_eq!(
        image_sizes(&s.infer("tiny", &body).expect(200).json()),
        vec![(64, 64)]
    );

    // Loading a loaded model reloads it; it stays served.
    assert_empty(&s.post("/v2/repository/models/ver/load", &json!({})), 200);
    assert_eq!(index(&s, json!({})), both_ready);
    let v = s
        .post("/v2/models/ver/versions/v1/infer", &body)
        .expect(200)
        .json();
    assert_eq!(v["model_version"], "v1");
}

/// The `slow` model's load waits on a named pipe (its `unet/config.json`) until the test
/// releases it, so the "loading" window is as long as the test needs, on any machine.
#[test]
fn a_loading_model_is_not_ready() {
    let repo = Repo::new();
    repo.tiny("fast");
    let gate = repo.slow_model("slow");
    let s = launch(&repo).no_wait_ready().start();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1}));

    // Models load in path order: `fast` first, then `slow` blocks.
    wait_until("model fast to be ready", START_TIMEOUT, || {
        s.get("/v2/models/fast/ready").status == 200
    });

    assert_empty(&s.get("/v2/health/live"), 200);
    assert_empty(&s.get("/v2/health/ready"), 400);
    assert_empty(&s.get("/v2/models/slow/ready"), 400);
    for action in ["infer", "generate", "infer_stream"] {
        let r = s.post(&format!("/v2/models/slow/{action}"), &body);
        r.expect(400);
        assert_eq!(
            r.json(),
            json!({"error": "Model slow is not ready yet."}),
            "{action}"
        );
    }
    assert_eq!(
        index(&s, json!({})),
        json!([
            {"name": "fast", "state": "READY", "reason": ""},
            {"name": "slow", "state": "UNKNOWN", "reason": ""}
        ])
    );
    assert_eq!(
        index(&s, json!({"ready": true})),
        json!([{"name": "fast", "state": "READY", "reason": ""}])
    );
    // The other model serves meanwhile.
    assert_eq!(
        image_sizes(&s.infer("fast", &body).expect(200).json()),
        vec![(64, 64)]
    );
    // Still loading: nothing above depended on timing.
    assert_empty(&s.get("/v2/models/slow/ready"), 400);

    gate.release();
    let mut s = s;
    s.wait_ready();
    assert_empty(&s.get("/v2/models/slow/ready"), 200);
    assert_eq!(
        image_sizes(&s.infer("slow", &body).expect(200).json()),
        vec![(64, 64)]
    );
    let m = s.scrape_settled();
    assert_eq!(
        m.value(
            "model_infer_request_failure_total",
            &[("model", "slow"), ("version", "None")]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "model_infer_request_success_total",
            &[("model", "slow"), ("version", "None")]
        ),
        1.0
    );
}

#[test]
fn models_load_on_demand_when_not_loaded_at_startup() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let mut broken = tiny_settings("broken", None);
    broken["parameters"]["uri"] = json!(repo.assets().join("does-not-exist"));
    repo.model("broken", broken);
    let s = launch(&repo)
        .args(["--load-models-at-startup", "false"])
        .no_wait_ready()
        .start();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1}));

    let unavailable = json!([
        {"name": "broken", "state": "UNAVAILABLE", "reason": ""},
        {"name": "tiny", "state": "UNAVAILABLE", "reason": ""}
    ]);
    assert_eq!(index(&s, json!({})), unavailable);
    let r = s.infer("tiny", &body);
    r.expect(404);
    assert_eq!(r.json(), json!({"error": "Model tiny not found"}));

    // A model that cannot load: a JSON error naming it; the server goes on.
    let r = s.post("/v2/repository/models/broken/load", &json!({}));
    assert!(
        r.status >= 400,
        "loading a broken model answered {}",
        r.status
    );
    let e = r.error();
    assert!(e.contains("broken") && e.contains("does-not-exist"), "{e}");
    assert_eq!(index(&s, json!({})), unavailable);

    assert_empty(&s.post("/v2/repository/models/tiny/load", &json!({})), 200);
    assert_empty(&s.get("/v2/models/tiny/ready"), 200);
    assert_empty(&s.get("/v2/health/ready"), 200);
    assert_eq!(
        image_sizes(&s.infer("tiny", &body).expect(200).json()),
        vec![(64, 64)]
    );
}

/// A model served from a folder whose files then change or vanish: each reload fails with a
/// 500 naming what is wrong, the version already loaded keeps serving the same images, and
/// once the files are back a reload succeeds.
#[test]
fn reloads_of_a_changed_or_vanished_folder_fail_cleanly_and_the_loaded_model_serves_on() {
    let repo = Repo::new();
    let folder = repo.linked_tiny("moving");
    let mut settings = tiny_settings("moving", None);
    settings["parameters"]["uri"] = json!(folder);
    repo.model("moving", settings);
    let s = launch(&repo).start();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1, "seed": 3}));
    let image =
        |s: &Server| s.infer("moving", &body).expect(200).json()["outputs"][0]["data"][0].clone();
    let before = image(&s);
    let reload = |s: &Server| s.post("/v2/repository/models/moving/load", &json!({}));
    let refused = |s: &Server, needle: &str| {
        let r = reload(s);
        r.expect(500);
        let message = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            message.contains("Model moving failed to load") && message.contains(needle),
            "{needle:?} not in {message:?}"
        );
        // Still served, the very same picture.
        assert_empty(&s.get("/v2/models/moving/ready"), 200);
        assert_eq!(image(s), before);
    };

    let weights = folder.join("unet/diffusion_pytorch_model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    refused(&s, "unet");

    // Cut short mid-tensor.
    std::fs::write(&weights, &original[..original.len() / 2]).unwrap();
    refused(&s, "diffusion_pytorch_model.safetensors");

    // A config that no longer matches the weights.
    std::fs::write(&weights, &original).unwrap();
    let config = folder.join("unet/config.json");
    let mut changed: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let first = changed["block_out_channels"][0].as_u64().unwrap();
    changed["block_out_channels"][0] = json!(first * 2);
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, changed.to_string()).unwrap();
    refused(&s, "shape");

    // The whole folder gone.
    let away = repo.assets().join("moved-away");
    std::fs::rename(&folder, &away).unwrap();
    refused(&s, "moving");

    // Back as it was: the reload succeeds and serves the same picture.
    std::fs::rename(&away, &folder).unwrap();
    std::os::unix::fs::symlink(tiny_model().join("unet/config.json"), {
        std::fs::remove_file(&config).unwrap();
        &config
    })
    .unwrap();
    assert_empty(&reload(&s), 200);
    assert_eq!(image(&s), before);
}
