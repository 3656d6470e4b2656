//! OpenAI's Images API against the real server, beside what `tests/python/test_openai_images.py`
//! checks with the `openai` package: the bearer token, the `rest_server_*` and model metrics of
//! the new routes, and hostile bodies (every one a 4xx in OpenAI's shape, nothing queued).

use serde_json::{Value, json};

use sdserve_tests::*;

const TOKEN: &str = "openai-t0ken";

fn server() -> (Repo, Server) {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"auth_token": TOKEN, "max_request_body_bytes": 200_000}));
    let s = launch(&repo).start();
    (repo, s)
}

fn post(s: &Server, path: &str, body: impl Into<Vec<u8>>, content_type: &str) -> Reply {
    s.send(
        s.client()
            .post(s.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", content_type)
            .body(body.into()),
    )
}

fn generate(s: &Server, body: &Value) -> Reply {
    post(
        s,
        "/v1/images/generations",
        body.to_string(),
        "application/json",
    )
}

/// OpenAI's error object of a reply, checked for its shape.
fn openai_error(r: &Reply) -> Value {
    let body = r.json();
    let e = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "no '{key}' in {body}");
    }
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    e.clone()
}

#[test]
fn the_bearer_token_guards_every_openai_route() {
    let (_repo, s) = server();
    let body = json!({"prompt": "a cat", "num_inference_steps": 1}).to_string();
    for (path, method) in [
        ("/v1/images/generations", "POST"),
        ("/v1/images/edits", "POST"),
        ("/v1/models", "GET"),
        ("/v1/models/tiny", "GET"),
    ] {
        for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
            let mut req = s
                .client()
                .request(method.parse().unwrap(), s.url(path))
                .body(body.clone());
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = s.send(req);
            assert_eq!(r.status, 401, "{path} with {auth:?}: {}", r.text());
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
            let e = openai_error(&r);
            assert_eq!(e["code"], "invalid_api_key", "{e}");
        }
    }
    let r = generate(&s, &json!({"prompt": "a cat", "num_inference_steps": 1}));
    let data = r.expect(200).json()["data"].clone();
    assert_eq!(data.as_array().map(Vec::len), Some(1), "{data}");
    assert_eq!(
        png_size(data[0]["b64_json"].as_str().unwrap()),
        (64, 64),
        "the model's own size when 'size' is not given"
    );
}

#[test]
fn openai_routes_are_counted_like_the_v2_routes() {
    let (_repo, s) = server();
    generate(&s, &json!({"prompt": "a cat", "num_inference_steps": 1})).expect(200);
    generate(&s, &json!({"prompt": "a cat", "size": "60x60"})).expect(400);
    let m = s.scrape_settled();
    let route = |status: &str| {
        m.value(
            "rest_server_requests_total",
            &[
                ("method", "POST"),
                ("path", "/v1/images/generations"),
                ("status_code", status),
            ],
        )
    };
    assert_eq!(
        (route("200"), route("400")),
        (1.0, 1.0),
        "{}",
        m.dump("rest_server_requests_total")
    );
    let model = [("model", "tiny"), ("version", "None")];
    assert_eq!(m.value("model_infer_request_success_total", &model), 1.0);
    assert_eq!(m.value("model_infer_request_failure_total", &model), 1.0);
}

/// An edit whose image is the first 100 bytes of a real PNG file.
fn truncated_png_edit() -> Vec<u8> {
    let png =
        std::fs::read(workspace_root().join("models/reference/img2img/input_odd.png")).unwrap();
    let mut body = b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n\
        --B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        .to_vec();
    body.extend_from_slice(&png[..100]);
    body.extend_from_slice(b"\r\n--B--\r\n");
    body
}

#[test]
fn unknown_routes_and_methods_under_v1_are_openai_shaped() {
    let (_repo, s) = server();
    let cases = [
        (Method::POST, "/v1/images/variations", 404),
        (Method::GET, "/v1", 404),
        (Method::GET, "/v1/", 404),
        (Method::GET, "/v1/chat/completions", 404),
        (Method::GET, "/v1/images/generations", 405),
        (Method::DELETE, "/v1/models/tiny", 405),
    ];
    for (method, path, status) in cases {
        let r = s.send(
            s.client()
                .request(method.clone(), s.url(path))
                .header("authorization", format!("Bearer {TOKEN}")),
        );
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        let e = openai_error(&r);
        assert!(e["message"].as_str().unwrap().contains(path), "{e}");
    }
}

#[test]
fn a_full_server_refuses_before_reading_the_body() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"auth_token": TOKEN}));
    let s = launch(&repo)
        .args(["--parallel-workers", "1", "--max-queue-size", "1"])
        .start();
    // Both slots taken: one generating, one queued behind it.
    let running = held_generation(&s, Some(TOKEN));
    wait_until("the first to run", START_TIMEOUT, || {
        s.gauge("sdserve_requests_running") == 1.0
    });
    let queued = held_generation(&s, Some(TOKEN));
    wait_until("the second to queue", START_TIMEOUT, || {
        s.gauge("sdserve_queue_depth") == 1.0
    });
    let r = generate(&s, &json!({"prompt": "a cat", "num_inference_steps": 1}));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(openai_error(&r)["code"], "server_overloaded");
    // A body that would be a 400 once read is refused unread.
    let r = post(&s, "/v1/images/generations", "{", "application/json");
    assert_eq!(r.status, 503, "{}", r.text());
    // With one model loaded, both refusals are counted for it.
    let overloaded = [("model", "tiny"), ("reason", "overloaded")];
    let m = s.scrape();
    assert_eq!(m.value("sdserve_request_failures_total", &overloaded), 2.0);
    drop((running, queued));
}

#[test]
fn hostile_bodies_are_openai_shaped_4xx_and_nothing_runs() {
    let (_repo, s) = server();
    let json_type = "application/json";
    let form_type = "multipart/form-data; boundary=B";
    let form = |parts: &str| parts.replace('\n', "\r\n").into_bytes();
    let cases: Vec<(&str, Vec<u8>, &str, u16, Value)> = vec![
        (
            "/v1/images/generations",
            b"{".to_vec(),
            json_type,
            400,
            Value::Null,
        ),
        (
            "/v1/images/generations",
            b"[]".to_vec(),
            json_type,
            400,
            Value::Null,
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x", "n": 1e300}).to_string().into_bytes(),
            json_type,
            400,
            json!("n"),
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x", "size": "1000000x1000000"})
                .to_string()
                .into_bytes(),
            json_type,
            400,
            json!("size"),
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x", "num_inference_steps": 100000})
                .to_string()
                .into_bytes(),
            json_type,
            400,
            json!("num_inference_steps"),
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x".repeat(300_000)})
                .to_string()
                .into_bytes(),
            json_type,
            413,
            Value::Null,
        ),
        (
            "/v1/images/edits",
            b"{}".to_vec(),
            json_type,
            400,
            Value::Null,
        ),
        (
            "/v1/images/edits",
            form("--B\nno headers"),
            form_type,
            400,
            Value::Null,
        ),
        (
            "/v1/images/edits",
            form("--B\nContent-Disposition: form-data; name=\"prompt\"\n\nx\n--B--\n"),
            form_type,
            400,
            json!("image"),
        ),
        (
            "/v1/images/edits",
            truncated_png_edit(),
            form_type,
            400,
            json!("image"),
        ),
    ];
    for (path, body, content_type, status, param) in cases {
        let r = post(&s, path, body, content_type);
        assert_eq!(r.status, status, "{path}: {}", r.text());
        let e = openai_error(&r);
        assert_eq!(e["type"], "invalid_request_error", "{e}");
        assert_eq!(e["param"], param, "{e}");
    }
    let m = s.scrape_settled();
    assert_eq!(
        m.find("sdserve_images_generated_total", &[("model", "tiny")])
            .unwrap_or(0.0),
        0.0
    );
}

#[test]
fn a_generation_body_over_its_own_bound_is_a_413_naming_it() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).start();
    // Under max_request_body_bytes (64 MiB by default), over a generation's 1 MiB.
    let body = json!({"prompt": "x".repeat(2 << 20)}).to_string();
    let r = s.send(
        s.client()
            .post(s.url("/v1/images/generations"))
            .header("content-type", "application/json")
            .body(body),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    let e = openai_error(&r);
    assert_eq!(e["code"], "request_too_large");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("generation's JSON body may hold at most 1048576 bytes"),
        "{e}"
    );
}
