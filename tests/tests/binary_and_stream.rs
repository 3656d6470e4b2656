//! Triton's binary tensor data extension on REST, and streaming progress, over real HTTP
//! against the real binary: binary inputs decode to the same request as JSON ones, binary
//! outputs carry the PNG files themselves, malformed binary bodies are 400s naming the input,
//! progress arrives one event per scheduler step, and a client that leaves stops the work.

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sdserve_tests::*;

/// A binary answer split into its JSON header and the image output's PNG files.
fn binary_reply(r: &Reply) -> (Value, Vec<Vec<u8>>) {
    r.expect(200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    let body = r.body();
    let n: usize = r
        .header("inference-header-content-length")
        .expect("Inference-Header-Content-Length on a binary answer")
        .parse()
        .expect("a number");
    assert!(n <= body.len(), "header length {n} > body {}", body.len());
    let header: Value = serde_json::from_slice(&body[..n]).expect("the header is JSON");
    let image = &header["outputs"][0];
    assert_eq!(image["name"], "image");
    assert_eq!(image["datatype"], "BYTES");
    assert!(
        image.get("data").is_none(),
        "binary output with data: {image}"
    );
    let size = image["parameters"]["binary_data_size"]
        .as_u64()
        .expect("binary_data_size") as usize;
    assert_eq!(size, body.len() - n, "binary_data_size vs the bytes sent");
    let mut pngs = Vec::new();
    let mut rest = &body[n..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        pngs.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    assert_eq!(
        json!([pngs.len(), 1]),
        image["shape"],
        "shape vs the elements sent"
    );
    (header, pngs)
}

/// Width and height of a PNG file, after decoding every pixel.
fn png_dims(bytes: &[u8]) -> (u32, u32) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("a PNG file");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG buffer size")];
    let frame = reader.next_frame(&mut buf).expect("PNG pixels decode");
    (frame.width, frame.height)
}

fn base64_images(v: &Value) -> Vec<Vec<u8>> {
    v["outputs"][0]["data"]
        .as_array()
        .expect("image data")
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d.as_str().expect("string"))
                .expect("base64")
        })
        .collect()
}

/// Opens an event stream: POSTs `body` as JSON to `path` and returns the live response.
fn open_stream(s: &Server, path: &str, body: &Value) -> reqwest::blocking::Response {
    s.client()
        .post(s.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("stream request")
}

/// Reads `data: {json}\n\n` events until the stream ends or `limit` events arrived.
fn read_events(response: &mut impl Read, limit: usize) -> Vec<Value> {
    let mut events = Vec::new();
    let mut pending = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while events.len() < limit
            && let Some(end) = pending.windows(2).position(|w| w == b"\n\n")
        {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event).expect("UTF-8 event");
            let data = text
                .trim_end()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without data: {text:?}"));
            events.push(serde_json::from_str(data).expect("event is JSON"));
        }
        if events.len() == limit {
            return events;
        }
        let n = response.read(&mut chunk).expect("reading the event stream");
        if n == 0 {
            assert!(
                pending.iter().all(u8::is_ascii_whitespace),
                "unterminated event: {:?}",
                String::from_utf8_lossy(&pending)
            );
            return events;
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// The progress events' `(step, total)`, checking their shape and that time goes forward.
fn progress(events: &[Value], id: &str) -> Vec<(u64, u64)> {
    let mut last_elapsed = 0.0;
    events
        .iter()
        .map(|e| {
            assert_eq!(e["id"], id);
            assert_eq!(e["outputs"], json!([]), "{e}");
            let p = &e["parameters"]["progress"];
            let elapsed = p["elapsed"].as_f64().expect("elapsed");
            assert!(elapsed >= last_elapsed, "elapsed went back: {e}");
            last_elapsed = elapsed;
            (
                p["step"].as_u64().expect("step"),
                p["total"].as_u64().expect("total"),
            )
        })
        .collect()
}

#[test]
fn binary_inputs_and_outputs_match_the_json_forms() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"extensions": ["custom_extension"]}));
    let s = launch(&repo).start();

    // Advertised beside the configured extensions.
    let meta = s.get("/v2").expect(200).json();
    assert_eq!(
        meta["extensions"],
        json!(["custom_extension", "binary_tensor_data"])
    );

    // tritonclient's form: a length-prefixed BYTES prompt, raw little-endian INT64 and UINT64
    // scalars, raw FP32 latents; the image asked for as binary.
    let latents: Vec<f32> = (0..4 * 8 * 8)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let latent_bytes: Vec<u8> = latents.iter().flat_map(|f| f.to_le_bytes()).collect();
    let prompt = bytes_tensor(&[b"a red circle"]);
    let header = json!({
        "id": "bin-1",
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": prompt.len()}},
            {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
            {"name": "seed", "shape": [1], "datatype": "UINT64", "parameters": {"binary_data_size": 8}},
            {"name": "latents", "shape": [1, 4, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": latent_bytes.len()}}
        ],
        "outputs": [{"name": "image", "parameters": {"binary_data": true}}]
    });
    let (body, n) = binary_body(
        &header,
        &[
            &prompt,
            &2i64.to_le_bytes(),
            &7u64.to_le_bytes(),
            &latent_bytes,
        ],
    );
    let r = post_binary(&s, "/v2/models/tiny/infer", &n.to_string(), body);
    let (head, pngs) = binary_reply(&r);
    assert_eq!(head["id"], "bin-1");
    assert_eq!(head["model_name"], "tiny");
    assert_eq!(head["parameters"]["num_inference_steps"], 2);
    assert_eq!(head["parameters"]["seeds"], json!([7]));
    assert_eq!(r.header("ce-id").as_deref(), Some("bin-1"));
    assert_eq!(pngs.len(), 1);
    assert_eq!(&pngs[0][..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(png_dims(&pngs[0]), (64, 64));

    // The same request in JSON gives the same image, byte for byte.
    let json_request = json!({
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red circle"]},
            {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "data": [2]},
            {"name": "seed", "shape": [1], "datatype": "UINT64", "data": [7]},
            {"name": "latents", "shape": [1, 4, 8, 8], "datatype": "FP32",
             "data": latents.iter().map(|&f| f64::from(f)).collect::<Vec<_>>()}
        ]
    });
    let v = s.infer("tiny", &json_request).expect(200).json();
    assert_eq!(
        base64_images(&v),
        pngs,
        "binary and JSON inputs gave different images"
    );

    // `binary_data_output` on the request counts when the body uses the extension's framing
    // (here a header that covers the whole JSON); two images, in prompt order.
    let mut two = prompt_request("a", json!({"seed": 5, "binary_data_output": true}));
    two["inputs"][0] =
        json!({"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]});
    let framed = |body: &Value| {
        let text = body.to_string();
        post_binary(
            &s,
            "/v2/models/tiny/infer",
            &text.len().to_string(),
            text.into_bytes(),
        )
    };
    let is_json = |r: &Reply| {
        r.expect(200);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert!(r.header("inference-header-content-length").is_none());
        base64_images(&r.json())
    };
    let (_, binary_pngs) = binary_reply(&framed(&two));
    assert_eq!(binary_pngs.len(), 2);
    for png in &binary_pngs {
        assert_eq!(png_dims(png), (64, 64));
    }
    // In a plain JSON body the request-level flag is ignored, as MLServer does: tritonclient
    // adds it to every request that names no outputs, and `mlserver infer` expects JSON.
    assert_eq!(is_json(&s.infer("tiny", &two)), binary_pngs);
    // `binary_data: false` on the output wins over the request's flag.
    two["outputs"] = json!([{"name": "image", "parameters": {"binary_data": false}}]);
    assert_eq!(is_json(&framed(&two)), binary_pngs);
    // `binary_data: true` on the output gives binary in a plain JSON body too.
    two["parameters"] = json!({"seed": 5});
    two["outputs"] = json!([{"name": "image", "parameters": {"binary_data": true}}]);
    assert_eq!(binary_reply(&s.infer("tiny", &two)).1, binary_pngs);
    // Without any flag the answer is JSON, as always.
    two.as_object_mut().unwrap().remove("outputs");
    assert_eq!(is_json(&s.infer("tiny", &two)), binary_pngs);

    // A raw binary request: the whole body is the prompt; the answer is binary.
    let r = post_binary(&s, "/v2/models/tiny/infer", "0", b"a blue square".to_vec());
    let (head, pngs) = binary_reply(&r);
    assert_eq!(pngs.len(), 1);
    assert_eq!(png_dims(&pngs[0]), (64, 64));
    assert_eq!(head["parameters"]["num_inference_steps"], 2);

    // Versioned-style routes and /generate take the same body; a gzip body is decoded before
    // the header length applies (tritonclient measures the header before compressing); the
    // answer is gzip-compressed when the client accepts it.
    let header = json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": prompt.len()}}],
                        "parameters": {"binary_data_output": true, "seed": 7}});
    let (body, n) = binary_body(&header, &[&prompt]);
    let r = s.send(
        s.client()
            .post(s.url("/v2/models/tiny/generate"))
            .header("inference-header-content-length", n.to_string())
            .header("content-encoding", "gzip")
            .header("accept-encoding", "gzip")
            .body(gzip(&body)),
    );
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let (_, pngs) = binary_reply(&r);
    assert_eq!(png_dims(&pngs[0]), (64, 64));

    // A binary input also works on a stream (the events themselves are JSON).
    let header = json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": prompt.len()}}]});
    let (body, n) = binary_body(&header, &[&prompt]);
    let r = post_binary(&s, "/v2/models/tiny/infer_stream", &n.to_string(), body);
    r.expect(200);
    let events = read_events(&mut std::io::Cursor::new(r.body()), usize::MAX);
    let last = events.last().expect("a final event");
    assert_eq!(image_sizes(last), vec![(64, 64)]);
}

#[test]
fn malformed_binary_bodies_are_400s_naming_the_input() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo)
        .args(["--max-request-body-bytes", "4096"])
        .start();
    let infer = "/v2/models/tiny/infer";
    let prompt_header = |size: usize| {
        json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                           "parameters": {"binary_data_size": size}}]})
    };
    let abc = bytes_tensor(&[b"abc"]);
    let mut beyond = vec![0xff, 0xff, 0xff, 0x0f];
    beyond.extend_from_slice(b"abc");

    let mut cases: Vec<(&str, Vec<u8>, String, &[&str])> = Vec::new();
    let (b, n) = binary_body(&prompt_header(100), &[&abc]);
    cases.push((
        "size beyond the body",
        b,
        n.to_string(),
        &["input 'prompt'", "binary_data_size is 100", "only 7 bytes"],
    ));
    let (b, n) = binary_body(&prompt_header(abc.len()), &[&abc, b"zz"]);
    cases.push((
        "bytes no input claims",
        b,
        n.to_string(),
        &["9 bytes after the JSON header", "account for only 7"],
    ));
    let (b, n) = binary_body(&prompt_header(beyond.len()), &[&beyond]);
    cases.push((
        "BYTES length prefix beyond the buffer",
        b,
        n.to_string(),
        &["input 'prompt'", "declares 268435455 bytes"],
    ));
    let (b, n) = binary_body(&prompt_header(2), &[&[3, 0]]);
    cases.push((
        "truncated length prefix",
        b,
        n.to_string(),
        &["input 'prompt'", "truncated"],
    ));
    let (b, n) = binary_body(&prompt_header(5), &[&[1, 0, 0, 0, 0xfe]]);
    cases.push((
        "not UTF-8",
        b,
        n.to_string(),
        &["input 'prompt' element 0 is not valid UTF-8"],
    ));
    // Bytes that are not text travel as bytes to the validator, which names the input: here
    // the start of a PNG file, cut off after its header.
    let png = bytes_tensor(&[b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"]);
    let (b, n) = binary_body(
        &json!({"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": abc.len()}},
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": png.len()}}
        ]}),
        &[&abc, &png],
    );
    cases.push((
        "an image input",
        b,
        n.to_string(),
        &["input 'image' element 0 cannot be decoded"],
    ));
    let (b, n) = binary_body(
        &json!({"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": abc.len()}},
            {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 7}}
        ]}),
        &[&abc, &[2, 0, 0, 0, 0, 0, 0]],
    );
    cases.push((
        "INT64 of 7 bytes",
        b,
        n.to_string(),
        &["input 'num_inference_steps'", "not a whole number of INT64"],
    ));
    let (b, n) = binary_body(
        &json!({"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": abc.len()}},
            {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 16}}
        ]}),
        &[&abc, &2i64.to_le_bytes(), &3i64.to_le_bytes()],
    );
    cases.push((
        "more elements than the shape",
        b,
        n.to_string(),
        &[
            "input 'num_inference_steps'",
            "needs 1 element(s) but data has 2",
        ],
    ));
    let (b, _) = binary_body(&prompt_header(abc.len()), &[&abc]);
    let len = b.len();
    cases.push((
        "header length beyond the body",
        b,
        (len + 10).to_string(),
        &["Inference-Header-Content-Length", "only"],
    ));
    cases.push((
        "header length not a number",
        b"{}".to_vec(),
        "ten".into(),
        &["Inference-Header-Content-Length", "\"ten\""],
    ));
    cases.push((
        "empty raw binary request",
        Vec::new(),
        "0".into(),
        &["raw binary request", "empty"],
    ));
    for (what, body, header_length, needles) in cases {
        let r = post_binary(&s, infer, &header_length, body);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let e = r.error();
        for n in needles {
            assert!(e.contains(n), "{what}: error {e:?} does not contain {n:?}");
        }
    }

    // binary_data_size without the header that frames the body.
    let r = s.post(infer, &prompt_header(3));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.error()
            .contains("input 'prompt' has parameters.binary_data_size")
    );
    // Flags must be booleans.
    let r = s.infer(
        "tiny",
        &prompt_request("a", json!({"binary_data_output": "yes"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("'binary_data_output'"), "{}", r.error());
    // An event stream cannot carry binary outputs.
    let mut wants_binary = prompt_request("a", json!({}));
    wants_binary["outputs"] = json!([{"name": "image", "parameters": {"binary_data": true}}]);
    let r = s.post("/v2/models/tiny/infer_stream", &wants_binary);
    assert_eq!(r.status, 400);
    assert!(r.error().contains("event stream"), "{}", r.error());
    // A JSON header that is not JSON is the 422 layer, as for plain bodies.
    let r = post_binary(&s, infer, "3", b"{x}abc".to_vec());
    assert_eq!(r.status, 422, "{}", r.text());

    // The body limit applies to binary bodies, before and after gzip.
    let big = vec![b'a'; 5000];
    let (b, n) = binary_body(&prompt_header(big.len() + 4), &[&bytes_tensor(&[&big])]);
    assert_eq!(
        post_binary(&s, infer, &n.to_string(), b.clone()).status,
        413
    );
    let r = s.send(
        s.client()
            .post(s.url(infer))
            .header("inference-header-content-length", n.to_string())
            .header("content-encoding", "gzip")
            .body(gzip(&b)),
    );
    assert_eq!(r.status, 413, "{}", r.text());

    // None of that reached the queue, and the server still answers.
    let m = s.scrape_settled();
    assert_eq!(m.value("parallel_request_queue_count", &[]), 0.0);
    let (b, n) = binary_body(&prompt_header(abc.len()), &[&abc]);
    let r = post_binary(&s, infer, &n.to_string(), b);
    r.expect(200);
    assert_eq!(image_sizes(&r.json()), vec![(64, 64)]);
}

#[test]
fn stream_reports_each_scheduler_step_then_the_response() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.tiny_versioned("ver", "v1");
    let s = launch(&repo).start();

    // PNDM (the tiny model's scheduler) makes 6 UNet passes for 5 steps, Euler 4 for 4: the
    // events count scheduler steps either way.
    for (path, scheduler, steps) in [
        ("/v2/models/tiny/infer_stream", "pndm", 5u64),
        ("/v2/models/tiny/generate_stream", "euler", 4),
        ("/v2/models/ver/versions/v1/infer_stream", "ddim", 3),
        ("/v2/models/ver/versions/v1/generate_stream", "pndm", 1),
    ] {
        let mut body = prompt_request(
            "a red circle",
            json!({"num_inference_steps": steps, "scheduler": scheduler, "width": 48}),
        );
        body["id"] = json!("s-1");
        let mut response = open_stream(&s, path, &body);
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = read_events(&mut response, usize::MAX);
        let (last, progress_events) = events.split_last().expect("events");
        let expected: Vec<(u64, u64)> = (1..=steps).map(|k| (k, steps)).collect();
        assert_eq!(
            progress(progress_events, "s-1"),
            expected,
            "{path} ({scheduler})"
        );
        assert_eq!(last["id"], "s-1");
        assert_eq!(last["parameters"]["num_inference_steps"], steps);
        assert_eq!(image_sizes(last), vec![(48, 64)], "{path}");
    }

    // Streams read to their end are not disconnections.
    let m = s.scrape_settled();
    for model in ["tiny", "ver"] {
        let left = m.find(
            "sdserve_request_failures_total",
            &[("model", model), ("reason", "disconnected")],
        );
        assert_eq!(left.unwrap_or(0.0), 0.0, "{model}");
    }
}

#[test]
fn a_client_that_leaves_mid_stream_stops_the_generation() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).start();
    let steps = 150;
    let disconnected = [("model", "tiny"), ("reason", "disconnected")];
    let step_count =
        |m: &Metrics| m.value("sdserve_denoise_step_seconds_count", &[("model", "tiny")]);

    let body = prompt_request(
        "a long one",
        json!({"num_inference_steps": steps, "scheduler": "euler"}),
    );
    let mut response = open_stream(&s, "/v2/models/tiny/infer_stream", &body);
    assert_eq!(response.status(), 200);
    let events = read_events(&mut response, 2);
    assert_eq!(
        events
            .iter()
            .map(|e| e["parameters"]["progress"]["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    // The events arrive while the generation runs, not buffered until its end.
    let m = s.scrape();
    assert_eq!(m.value("sdserve_requests_running", &[]), 1.0);
    assert!(step_count(&m) < steps as f64);

    drop(response);
    let left = Instant::now();
    wait_until(
        "the generation to stop after the client left",
        Duration::from_secs(20),
        || {
            let m = s.scrape();
            m.find("sdserve_request_failures_total", &disconnected) == Some(1.0)
                && m.value("sdserve_requests_running", &[]) == 0.0
        },
    );
    let stopped_after = left.elapsed();
    let at_stop = step_count(&s.scrape());
    assert!(
        at_stop < steps as f64 / 2.0,
        "{at_stop} of {steps} steps ran although the client left"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        step_count(&s.scrape()),
        at_stop,
        "steps still run after the stop"
    );

    // The worker is free at once: the next request does not wait in the queue.
    let v = s
        .infer("tiny", &prompt_request("next", json!({})))
        .expect(200)
        .json();
    let queued = v["parameters"]["queue_seconds"].as_f64().unwrap();
    assert!(queued < 1.0, "the next request waited {queued} s");
    let m = s.scrape_settled();
    assert_eq!(
        m.value("sdserve_request_failures_total", &disconnected),
        1.0
    );
    eprintln!(
        "stopped {:.0} ms after the client left, at step {at_stop} of {steps}",
        stopped_after.as_secs_f64() * 1000.0
    );
}

#[test]
fn stream_previews_every_k_steps() {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).start();

    // PNDM: 7 UNet passes for 6 steps; previews follow steps, not passes.
    let mut body = prompt_request(
        "a red circle",
        json!({"num_inference_steps": 6, "num_images_per_prompt": 2, "preview_every": 2,
               "width": 48, "seed": 3}),
    );
    body["id"] = json!("p-1");
    let mut response = open_stream(&s, "/v2/models/tiny/infer_stream", &body);
    assert_eq!(response.status(), 200);
    let events = read_events(&mut response, usize::MAX);
    let (last, progress_events) = events.split_last().expect("events");
    let mut previews = Vec::new();
    for e in progress_events {
        let step = e["parameters"]["progress"]["step"].as_u64().expect("step");
        if e["outputs"] == json!([]) {
            continue;
        }
        let out = &e["outputs"][0];
        assert_eq!(out["name"], "preview", "{e}");
        assert_eq!(out["datatype"], "BYTES");
        assert_eq!(out["shape"], json!([2, 1]));
        assert_eq!(out["parameters"]["content_type"], "base64");
        let images = base64_images(e);
        assert!(
            images.iter().all(|png| png_dims(png) == (48, 64)),
            "step {step}"
        );
        previews.push((step, images));
    }
    // Every second step but the last, whose image is the result itself.
    assert_eq!(previews.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 4]);
    assert_ne!(
        previews[0].1, previews[1].1,
        "previews follow the denoising"
    );
    assert_eq!(image_sizes(last), vec![(48, 64), (48, 64)]);

    // Without preview_every, events carry no images (checked by `progress`).
    let plain = prompt_request("a red circle", json!({"num_inference_steps": 2}));
    let mut response = open_stream(&s, "/v2/models/tiny/infer_stream", &plain);
    let events = read_events(&mut response, usize::MAX);
    let id = events[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(progress(&events[..2], &id), [(1, 2), (2, 2)]);

    // Bad values and non-stream routes are 400s naming the parameter.
    for (path, k, needle) in [
        (
            "/v2/models/tiny/infer_stream",
            json!(0),
            "between 1 and the steps that run (3)",
        ),
        (
            "/v2/models/tiny/infer_stream",
            json!(4),
            "between 1 and the steps that run (3)",
        ),
        ("/v2/models/tiny/infer_stream", json!("2"), "preview_every"),
        ("/v2/models/tiny/infer", json!(1), "needs a streaming route"),
        (
            "/v2/models/tiny/generate",
            json!(1),
            "needs a streaming route",
        ),
    ] {
        let body = prompt_request(
            "a red circle",
            json!({"num_inference_steps": 3, "preview_every": k}),
        );
        let r = s.post(path, &body);
        r.expect(400);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            msg.contains("preview_every") && msg.contains(needle),
            "{path} {k}: {msg}"
        );
    }
}
