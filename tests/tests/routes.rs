//! Every route of MLServer 1.7.1's REST table, over real HTTP against the real binary: status
//! codes, bodies and headers for success and for each kind of failure.

use sdserve_tests::*;

/// A repository with an unversioned model `tiny` and a model `ver` at version `v1`.
fn two_models() -> (Repo, Server) {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.tiny_versioned("ver", "v1");
    let server = launch(&repo).start();
    (repo, server)
}

fn assert_empty_200(r: &Reply) {
    r.expect(200);
    assert!(
        r.raw.is_empty(),
        "expected an empty body, got {:?}",
        r.text()
    );
}

fn assert_error(r: &Reply, status: u16, message: &str) {
    r.expect(status);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.json(), json!({ "error": message }), "body of a {status}");
}

/// The JSON events of a `text/event-stream` body.
fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without data: {e:?}"));
            serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("event is not JSON ({err}): {data}"))
        })
        .collect()
}

#[test]
fn health_metadata_docs_and_fallbacks() {
    let (_repo, s) = two_models();

    let v2 = s.get("/v2");
    v2.expect(200);
    let meta = v2.json();
    assert_eq!(meta["name"], "mlserver");
    assert!(
        meta["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{meta}"
    );
    // Triton's binary tensor data extension is always there (configured ones come first).
    assert_eq!(meta["extensions"], json!(["binary_tensor_data"]));

    assert_empty_200(&s.get("/v2/health/live"));
    assert_empty_200(&s.get("/v2/health/ready"));

    for (path, name) in [
        ("/v2/models/tiny", "tiny"),
        ("/v2/models/ver/versions/v1", "ver"),
        ("/v2/models/ver", "ver"),
    ] {
        let r = s.get(path);
        r.expect(200);
        let m = r.json();
        assert_eq!(m["name"], name, "{path}");
        assert_eq!(m["platform"], "", "{path}");
        assert_eq!(
            m["versions"],
            json!([]),
            "{path}: `versions` lists dependency versions, none here"
        );
        let inputs: Vec<&str> = m["inputs"]
            .as_array()
            .expect("inputs")
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert!(
            inputs.contains(&"prompt") && inputs.contains(&"num_inference_steps"),
            "{path}: {inputs:?}"
        );
        assert_eq!(m["outputs"][0]["name"], "image", "{path}");
    }

    assert_empty_200(&s.get("/v2/models/tiny/ready"));
    assert_empty_200(&s.get("/v2/models/ver/ready"));
    assert_empty_200(&s.get("/v2/models/ver/versions/v1/ready"));

    let doc = s.get("/v2/docs/dataplane.json");
    doc.expect(200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["info"]["title"], "Data Plane");
    for p in [
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/generate_stream",
        "/v2/repository/index",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the data plane document"
        );
    }
    let openapi = s.get("/openapi.json");
    openapi.expect(200);
    assert!(openapi.json()["paths"].is_object());

    for (path, title, infer_path) in [
        (
            "/v2/models/tiny/docs/dataplane.json",
            "Data Plane for Model tiny",
            "/v2/models/tiny/infer",
        ),
        (
            "/v2/models/ver/versions/v1/docs/dataplane.json",
            "Data Plane for Model ver",
            "/v2/models/ver/versions/v1/infer",
        ),
    ] {
        let r = s.get(path);
        r.expect(200);
        let d = r.json();
        assert_eq!(d["info"]["title"], title);
        assert!(
            d["paths"].get(infer_path).is_some(),
            "{path}: no {infer_path} in {}",
            d["paths"]
        );
        // The document describes this server's real inputs, not the generic tensor schema only.
        let text = d.to_string();
        for name in [
            "\"prompt\"",
            "\"negative_prompt\"",
            "num_inference_steps",
            "\"image\"",
        ] {
            assert!(text.contains(name), "{path} does not mention {name}");
        }
    }

    for (path, spec) in [
        ("/v2/docs", "/v2/docs/dataplane.json"),
        (
            "/v2/models/tiny/docs",
            "/v2/models/tiny/docs/dataplane.json",
        ),
        (
            "/v2/models/ver/versions/v1/docs",
            "/v2/models/ver/versions/v1/docs/dataplane.json",
        ),
    ] {
        let r = s.get(path);
        r.expect(200);
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(r.text().contains(spec), "{path} does not load {spec}");
    }

    // Unknown paths and wrong methods: JSON bodies, as every error this server produces.
    for path in ["/v2/nope", "/metrics", "/docs", "/v2/models/tiny/nope"] {
        let r = s.get(path);
        r.expect(404);
        assert_eq!(
            r.json(),
            json!({"error": "Not Found", "detail": "Not Found"}),
            "{path}"
        );
    }
    for (method, path, allow) in [
        (Method::GET, "/v2/models/tiny/infer", "POST"),
        (
            Method::GET,
            "/v2/models/tiny/versions/v1/generate_stream",
            "POST",
        ),
        (Method::DELETE, "/v2/repository/index", "POST"),
        (Method::POST, "/v2/health/live", "GET"),
        (Method::PUT, "/v2/models/tiny", "GET"),
    ] {
        let r = s.request(method.clone(), path);
        r.expect(405);
        assert_eq!(
            r.json(),
            json!({"error": "Method Not Allowed", "detail": "Method Not Allowed"}),
            "{method} {path}"
        );
        let allowed = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no allow header"));
        assert!(
            allowed.split(',').any(|m| m.trim() == allow),
            "{method} {path}: allow is {allowed:?}"
        );
    }
}

#[test]
fn unknown_model_and_unknown_version() {
    let (_repo, s) = two_models();
    let body = prompt_request("a cat", json!({}));
    for suffix in ["", "/ready", "/docs", "/docs/dataplane.json"] {
        assert_error(
            &s.get(&format!("/v2/models/nope{suffix}")),
            404,
            "Model nope not found",
        );
        assert_error(
            &s.get(&format!("/v2/models/nope/versions/v1{suffix}")),
            404,
            "Model nope with version v1 not found",
        );
        assert_error(
            &s.get(&format!("/v2/models/ver/versions/v9{suffix}")),
            404,
            "Model ver with version v9 not found",
        );
    }
    for action in ["infer", "generate", "infer_stream", "generate_stream"] {
        assert_error(
            &s.post(&format!("/v2/models/nope/{action}"), &body),
            404,
            "Model nope not found",
        );
        assert_error(
            &s.post(&format!("/v2/models/ver/versions/v9/{action}"), &body),
            404,
            "Model ver with version v9 not found",
        );
        // An unversioned model has no version "v1".
        assert_error(
            &s.post(&format!("/v2/models/tiny/versions/v1/{action}"), &body),
            404,
            "Model tiny with version v1 not found",
        );
    }
    assert_error(
        &s.post("/v2/repository/models/nope/load", &json!({})),
        404,
        "Model nope not found",
    );
    assert_error(
        &s.post("/v2/repository/models/nope/unload", &json!({})),
        404,
        "Model nope not found",
    );
}

#[test]
fn infer_returns_images_of_the_requested_size() {
    let (_repo, s) = two_models();

    let r = s.infer(
        "tiny",
        &prompt_request(
            "a red circle",
            json!({"width": 64, "height": 48, "seed": 7}),
        ),
    );
    r.expect(200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(image_sizes(&v), vec![(64, 48)]);
    assert_eq!(v["model_name"], "tiny");
    assert!(
        v.get("model_version").is_none(),
        "an unversioned model has no model_version: {v}"
    );
    assert_eq!(v["outputs"][0]["shape"], json!([1, 1]));
    let p = &v["parameters"];
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(64), Some(48)),
        "{p}"
    );
    assert_eq!(p["seeds"], json!([7]));
    assert_eq!(
        p["num_inference_steps"], 2,
        "the model's default from parameters.extra.defaults"
    );

    // No size: the model's native 64×64.
    let v = s
        .infer("tiny", &prompt_request("a blue square", json!({})))
        .expect(200)
        .json();
    assert_eq!(image_sizes(&v), vec![(64, 64)]);

    // Size as INT32 inputs; two prompts give two images in order.
    let body = json!({
        "inputs": [
            {"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["one", "two"]},
            {"name": "height", "shape": [1], "datatype": "INT32", "data": [32]},
            {"name": "width", "shape": [1], "datatype": "INT32", "data": [40]}
        ],
        "parameters": {"num_inference_steps": 1}
    });
    let v = s.infer("tiny", &body).expect(200).json();
    assert_eq!(image_sizes(&v), vec![(40, 32), (40, 32)]);
    assert_eq!(v["outputs"][0]["shape"], json!([2, 1]));
    assert_eq!(v["parameters"]["seeds"].as_array().map(Vec::len), Some(2));
}

#[test]
fn every_infer_route_variant_generates() {
    let (_repo, s) = two_models();
    let body = prompt_request(
        "a tree",
        json!({"num_inference_steps": 1, "width": 48, "height": 56}),
    );
    for (path, version) in [
        ("/v2/models/tiny/infer", None),
        ("/v2/models/tiny/generate", None),
        ("/v2/models/ver/versions/v1/infer", Some("v1")),
        ("/v2/models/ver/versions/v1/generate", Some("v1")),
        // Without /versions/ the newest (here the only) version answers.
        ("/v2/models/ver/infer", Some("v1")),
    ] {
        let v = s.post(path, &body).expect(200).json();
        assert_eq!(image_sizes(&v), vec![(48, 56)], "{path}");
        assert_eq!(
            v.get("model_version").and_then(Value::as_str),
            version,
            "{path}: {}",
            v["model_version"]
        );
    }

    for (path, model, version) in [
        ("/v2/models/tiny/infer_stream", "tiny", None),
        ("/v2/models/tiny/generate_stream", "tiny", None),
        ("/v2/models/ver/versions/v1/infer_stream", "ver", Some("v1")),
        (
            "/v2/models/ver/versions/v1/generate_stream",
            "ver",
            Some("v1"),
        ),
    ] {
        let mut with_id = body.clone();
        with_id["id"] = json!("stream-1");
        let r = s.post(path, &with_id);
        r.expect(200);
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("text/event-stream"),
            "{path}"
        );
        let events = sse_events(&r.text());
        let (last, progress) = events
            .split_last()
            .unwrap_or_else(|| panic!("{path}: no events"));
        assert!(
            !progress.is_empty(),
            "{path}: no progress event before the result"
        );
        for e in progress {
            assert_eq!(e["id"], "stream-1");
            assert_eq!(e["outputs"], json!([]));
            assert!(
                e["parameters"]["progress"]["step"].as_u64().is_some(),
                "{path}: {e}"
            );
        }
        assert_eq!(last["model_name"], model);
        assert_eq!(last["id"], "stream-1");
        assert_eq!(
            last.get("model_version").and_then(Value::as_str),
            version,
            "{path}"
        );
        assert_eq!(image_sizes(last), vec![(48, 56)], "{path}");
        // As in MLServer, the CloudEvents headers travel inside the streamed response.
        assert_eq!(
            last["parameters"]["headers"]["ce-id"], "stream-1",
            "{path}: {}",
            last["parameters"]
        );
    }
}

#[test]
fn invalid_requests_are_rejected_with_json_errors() {
    let (_repo, s) = two_models();
    let prompt = |parameters: Value| prompt_request("x", parameters);

    // Not JSON, or not the V2 schema: 422 with FastAPI's `detail` beside `error`.
    for (what, body) in [
        ("truncated JSON", b"{\"inputs\": [".to_vec()),
        ("empty body", Vec::new()),
        ("no inputs", b"{}".to_vec()),
        (
            "datatype outside the V2 enum",
            br#"{"inputs":[{"name":"prompt","shape":[1],"datatype":"STRING","data":["x"]}]}"#
                .to_vec(),
        ),
    ] {
        let r = s.post_bytes("/v2/models/tiny/infer", body);
        assert_eq!(r.status, 422, "{what}: {}", r.text());
        let v = r.json();
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {v}"
        );
        assert!(
            v["detail"].as_array().is_some_and(|d| !d.is_empty()),
            "{what}: {v}"
        );
    }
    let truncated = s
        .post_bytes("/v2/models/tiny/infer", b"{\"inputs\": [".to_vec())
        .json();
    assert_eq!(truncated["detail"][0]["type"], "json_invalid");

    // Valid V2, broken contract or out of range: 400 naming the field.
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "wrong datatype",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "INT32", "data": [1]}]}),
            &["'prompt'", "INT32", "BYTES"],
        ),
        (
            "missing prompt",
            json!({"inputs": [{"name": "negative_prompt", "shape": [1], "datatype": "BYTES", "data": ["blurry"]}]}),
            &["missing input 'prompt'"],
        ),
        (
            "unknown input name",
            json!({"inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                {"name": "promt", "shape": [1], "datatype": "BYTES", "data": ["x"]}
            ]}),
            &["unknown input 'promt'"],
        ),
        (
            "zero steps",
            prompt(json!({"num_inference_steps": 0})),
            &["'num_inference_steps' is 0", "150"],
        ),
        (
            "too many steps",
            prompt(json!({"num_inference_steps": 151})),
            &["'num_inference_steps' is 151", "150"],
        ),
        (
            "width not a multiple of 8",
            prompt(json!({"width": 65})),
            &["'width' is 65", "multiple of 8"],
        ),
        (
            "height too large",
            prompt(json!({"height": 4096})),
            &["'height' is 4096", "2048"],
        ),
        (
            "shape and data disagree",
            json!({"inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}),
            &["'prompt'", "shape"],
        ),
    ];
    for (what, body, needles) in cases {
        for path in [
            "/v2/models/tiny/infer",
            "/v2/models/ver/versions/v1/generate",
            "/v2/models/tiny/infer_stream",
        ] {
            let r = s.post(path, &body);
            assert_eq!(r.status, 400, "{what} on {path}: {}", r.text());
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json"),
                "{what}"
            );
            let v = r.json();
            assert_eq!(
                v.as_object().map(|o| o.len()),
                Some(1),
                "{what}: only `error` expected: {v}"
            );
            let e = r.error();
            for n in needles {
                assert!(e.contains(n), "{what}: error {e:?} does not contain {n:?}");
            }
        }
    }

    // Nothing invalid reached the queue.
    let m = s.scrape_settled();
    assert_eq!(m.value("parallel_request_queue_count", &[]), 0.0);
}

#[test]
fn gzip_cloudevents_and_request_ids() {
    let (_repo, s) = two_models();
    let body = prompt_request("a cat", json!({"num_inference_steps": 1}));

    // A gzip-compressed request body is accepted.
    let mut with_id = body.clone();
    with_id["id"] = json!("req-42");
    let packed = gzip(with_id.to_string().as_bytes());
    let r = s.send(
        s.client()
            .post(s.url("/v2/models/tiny/infer"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(packed),
    );
    r.expect(200);
    assert_eq!(
        r.header("content-encoding"),
        None,
        "not compressed unless asked"
    );
    let v = r.json();
    assert_eq!(v["id"], "req-42");
    assert_eq!(image_sizes(&v), vec![(64, 64)]);
    for (h, want) in [
        ("ce-specversion", "0.3"),
        ("ce-source", "io.seldon.serving.deployment.mlserver"),
        ("ce-type", "io.seldon.serving.inference.response"),
        ("ce-modelid", "tiny"),
        ("ce-inferenceservicename", "mlserver"),
        ("ce-endpoint", "tiny"),
        ("ce-id", "req-42"),
        ("ce-requestid", "req-42"),
    ] {
        assert_eq!(r.header(h).as_deref(), Some(want), "header {h}");
    }

    // Without an id: a fresh UUID in the body and the headers, different per request.
    let a = s.infer("tiny", &body).expect(200).clone();
    let b = s.infer("tiny", &body).expect(200).clone();
    let (ida, idb) = (
        a.json()["id"].as_str().unwrap().to_owned(),
        b.json()["id"].as_str().unwrap().to_owned(),
    );
    assert!(is_uuid_v4(&ida), "{ida:?} is not a UUID v4");
    assert_ne!(ida, idb);
    assert_eq!(a.header("ce-id"), Some(ida.clone()));
    assert_eq!(a.header("ce-requestid"), Some(ida));

    // A compressed answer when asked for, for bodies of 500 bytes and more.
    let r = s.send(
        s.client()
            .post(s.url("/v2/models/tiny/infer"))
            .header("accept-encoding", "gzip")
            .json(&body),
    );
    r.expect(200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        image_sizes(&r.json()),
        vec![(64, 64)],
        "the compressed body decodes to a full response"
    );
    assert!(r.raw.len() < r.body().len());
    // A short error body stays plain.
    let r = s.send(
        s.client()
            .get(s.url("/v2/models/nope"))
            .header("accept-encoding", "gzip"),
    );
    r.expect(404);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.json(), json!({"error": "Model nope not found"}));
    // Large metadata documents are compressed too.
    let r = s.send(
        s.client()
            .get(s.url("/v2/docs/dataplane.json"))
            .header("accept-encoding", "gzip"),
    );
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(r.json()["info"]["title"], "Data Plane");
}
