//! Image-to-image and inpainting through the real binary: the input image (and mask) as base64
//! in JSON and as raw bytes through the binary tensor extension give the same picture, progress
//! counts the steps that run, previews stream, and hostile images are 400s naming the field that
//! leave the server's memory and queue as they were. (gRPC and `tritonclient`: `tests/python`, run by
//! `clients.rs`.)

use base64::Engine as _;
use sdserve_tests::*;

/// A 67×61 picture: image-to-image makes 64×56 of it (sides rounded down to multiples of 8).
fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("models/reference/img2img").join(name)).expect(name)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A JSON request with the image as MLServer's base64 codec sends it.
fn json_request(image: &[u8], parameters: Value) -> Value {
    json!({
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red circle"]},
            {"name": "image", "shape": [1], "datatype": "BYTES",
             "parameters": {"content_type": "base64"}, "data": [b64(image)]}
        ],
        "parameters": parameters
    })
}

fn server() -> (Repo, Server) {
    let repo = Repo::new();
    repo.tiny("tiny");
    let s = launch(&repo).start();
    (repo, s)
}

#[test]
fn json_base64_and_binary_raw_bytes_give_the_same_image() {
    let (_repo, s) = server();
    let params = json!({"seed": 9, "num_inference_steps": 6, "strength": 0.5});
    let image = fixture("input_odd.png");
    let v = s
        .infer("tiny", &json_request(&image, params.clone()))
        .expect(200)
        .json();
    assert_eq!(image_sizes(&v), vec![(64, 56)]);
    // int(6 × 0.5) = 3 of the 6 steps ran.
    assert_eq!(v["parameters"]["strength"], json!(0.5));
    assert_eq!(v["parameters"]["steps_run"], json!(3));
    let from_json = v["outputs"][0]["data"][0].as_str().unwrap().to_owned();

    // The same request with the file as a binary BYTES tensor (raw, no base64).
    let prompt = bytes_tensor(&[b"a red circle"]);
    let file = bytes_tensor(&[&image]);
    let header = json!({
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES",
             "parameters": {"binary_data_size": prompt.len()}},
            {"name": "image", "shape": [1], "datatype": "BYTES",
             "parameters": {"binary_data_size": file.len()}}
        ],
        "parameters": params
    });
    let (body, n) = binary_body(&header, &[&prompt, &file]);
    let r = post_binary(&s, "/v2/models/tiny/infer", &n.to_string(), body);
    let v = r.expect(200).json();
    assert_eq!(v["outputs"][0]["data"][0].as_str().unwrap(), from_json);

    // Strength changes the picture; a strength of 1 still starts from the image's latents
    // noised all the way, so it differs from text-to-image with the same seed.
    let other = s
        .infer(
            "tiny",
            &json_request(
                &image,
                json!({"seed": 9, "num_inference_steps": 6, "strength": 0.9}),
            ),
        )
        .expect(200)
        .json();
    assert_ne!(other["outputs"][0]["data"][0].as_str().unwrap(), from_json);

    // The model's metadata lists the image-to-image inputs.
    let meta = s.get("/v2/models/tiny").expect(200).json();
    let names: Vec<&str> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"image") && names.contains(&"strength"),
        "{names:?}"
    );
}

#[test]
fn the_stream_counts_the_steps_that_run_and_previews_them() {
    let (_repo, s) = server();
    // int(6 × 0.5) = 3 of 6 steps run.
    let body = json_request(
        &fixture("input_0.png"),
        json!({"seed": 1, "num_inference_steps": 6, "strength": 0.5, "preview_every": 1}),
    );
    let r = s
        .post("/v2/models/tiny/infer_stream", &body)
        .expect(200)
        .text();
    let events: Vec<Value> = r
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("JSON event"))
        .collect();
    let steps: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| {
            let p = e["parameters"].get("progress")?;
            Some((p["step"].as_u64()?, p["total"].as_u64()?))
        })
        .collect();
    assert_eq!(steps, [(1, 3), (2, 3), (3, 3)]);
    let previews = events
        .iter()
        .filter(|e| {
            e["outputs"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["name"] == "preview"))
        })
        .count();
    // A preview after every step but the last, whose image is the result.
    assert_eq!(previews, 2);
    assert_eq!(image_sizes(events.last().unwrap()), vec![(64, 64)]);
    // Previews every 4 steps would never come: 3 steps run.
    let body = json_request(
        &fixture("input_0.png"),
        json!({"num_inference_steps": 6, "strength": 0.5, "preview_every": 4}),
    );
    let e = s
        .post("/v2/models/tiny/infer_stream", &body)
        .expect(400)
        .error();
    assert!(e.contains("preview_every") && e.contains("(3)"), "{e}");
}

#[test]
fn hostile_images_are_400s_that_leave_memory_and_queue_unchanged() {
    let (_repo, s) = server();
    let good = fixture("input_0.png");
    // Warm up, so that the first generation's allocations are not counted below.
    s.infer(
        "tiny",
        &json_request(&good, json!({"num_inference_steps": 2})),
    )
    .expect(200);
    let steps_before = s
        .scrape()
        .value("sdserve_denoise_step_seconds_count", &[("model", "tiny")]);
    let rss_before = rss_kib(s.pid());

    let nan_strength = {
        // NaN cannot be written in JSON: an FP32 binary tensor carries it.
        let prompt = bytes_tensor(&[b"a"]);
        let file = bytes_tensor(&[&good]);
        let header = json!({"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": prompt.len()}},
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": file.len()}},
            {"name": "strength", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]});
        binary_body(&header, &[&prompt, &file, &f32::NAN.to_le_bytes()])
    };
    let cases: Vec<(&str, Reply)> = vec![
        (
            "input 'image' element 0 declares 100000×100000 pixels",
            s.infer("tiny", &json_request(&fixture("bomb.png"), json!({}))),
        ),
        (
            "input 'image' element 0 cannot be decoded",
            s.infer("tiny", &json_request(&fixture("truncated.jpg"), json!({}))),
        ),
        (
            "input 'image' element 0 is not a PNG, JPEG or WebP file",
            s.infer("tiny", &json_request(b"GIF89a....", json!({}))),
        ),
        (
            "'strength' is 0;",
            s.infer("tiny", &json_request(&good, json!({"strength": 0.0}))),
        ),
        (
            "'strength' is 1.5;",
            s.infer("tiny", &json_request(&good, json!({"strength": 1.5}))),
        ),
        (
            "input 'strength' element 0 is NaN",
            post_binary(
                &s,
                "/v2/models/tiny/infer",
                &nan_strength.1.to_string(),
                nan_strength.0,
            ),
        ),
        (
            "'strength' (0.5) applies only to image-to-image",
            s.infer("tiny", &prompt_request("a", json!({"strength": 0.5}))),
        ),
        (
            "input 'mask_image' element 0 declares 100000×100000 pixels",
            s.infer(
                "tiny",
                &inpaint_request(&good, &fixture("bomb.png"), json!({})),
            ),
        ),
        (
            "input 'mask_image' needs an 'image' input",
            s.infer("tiny", &{
                let mut r = inpaint_request(&good, &good, json!({}));
                r["inputs"].as_array_mut().unwrap().remove(1);
                r
            }),
        ),
        (
            "input 'image' element 0 is not valid base64",
            s.infer(
                "tiny",
                &json!({"inputs": [
                    {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                    {"name": "image", "shape": [1], "datatype": "BYTES",
                     "parameters": {"content_type": "base64"}, "data": ["%%%"]}]}),
            ),
        ),
    ];
    for (expected, reply) in &cases {
        let e = reply.expect(400).error();
        assert!(e.contains(expected), "expected {expected:?}, got {e:?}");
    }
    let rss_after = rss_kib(s.pid());
    let m = s.scrape();
    assert_eq!(m.value("sdserve_queue_depth", &[]), 0.0);
    assert_eq!(
        m.value("sdserve_denoise_step_seconds_count", &[("model", "tiny")]),
        steps_before,
        "a refused request ran steps"
    );
    println!(
        "RSS before {rss_before} KiB, after {} hostile requests {rss_after} KiB",
        cases.len()
    );
    // A decoded 100000² image would be 30 GB; the allowance is for allocator noise.
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

/// `json_request` with a mask beside the image.
fn inpaint_request(image: &[u8], mask: &[u8], parameters: Value) -> Value {
    let mut r = json_request(image, parameters);
    r["inputs"].as_array_mut().unwrap().push(json!(
        {"name": "mask_image", "shape": [1], "datatype": "BYTES",
         "parameters": {"content_type": "base64"}, "data": [b64(mask)]}));
    r
}

#[test]
fn inpainting_over_json_and_binary_on_plain_and_inpainting_unets() {
    let repo = Repo::new();
    repo.tiny("tiny");
    for (name, folder) in [
        ("inpaint", "models/tiny-sd1-inpaint"),
        ("xl", "models/tiny-sdxl"),
    ] {
        let mut settings = tiny_settings(name, None);
        settings["parameters"]["uri"] = json!(workspace_root().join(folder));
        repo.model(name, settings);
    }
    let s = launch(&repo).start();
    let (image, mask) = (fixture("input_0.png"), fixture("mask_0.png"));
    let params = json!({"seed": 2, "num_inference_steps": 4});
    for model in ["tiny", "inpaint"] {
        let v = s
            .infer(model, &inpaint_request(&image, &mask, params.clone()))
            .expect(200)
            .json();
        assert_eq!(image_sizes(&v), vec![(64, 64)], "{model}");
        assert_eq!(
            v["parameters"]["strength"],
            json!(1.0),
            "inpainting's default"
        );
        let from_json = v["outputs"][0]["data"][0].as_str().unwrap().to_owned();
        // Raw bytes through the binary extension: the same image.
        let tensors: Vec<Vec<u8>> = [b"a red circle".as_slice(), &image, &mask]
            .iter()
            .map(|t| bytes_tensor(&[t]))
            .collect();
        let inputs: Vec<Value> = ["prompt", "image", "mask_image"]
            .iter()
            .zip(&tensors)
            .map(|(n, t)| {
                json!({"name": n, "shape": [1], "datatype": "BYTES",
                       "parameters": {"binary_data_size": t.len()}})
            })
            .collect();
        let header = json!({"inputs": inputs, "parameters": params});
        let refs: Vec<&[u8]> = tensors.iter().map(Vec::as_slice).collect();
        let (body, n) = binary_body(&header, &refs);
        let v = post_binary(
            &s,
            &format!("/v2/models/{model}/infer"),
            &n.to_string(),
            body,
        )
        .expect(200)
        .json();
        assert_eq!(
            v["outputs"][0]["data"][0].as_str().unwrap(),
            from_json,
            "{model}"
        );
        // Another mask, of another size (resized like the image), changes the picture.
        let other = s
            .infer(
                model,
                &inpaint_request(&image, &fixture("mask_odd.png"), params.clone()),
            )
            .expect(200)
            .json();
        assert_ne!(
            other["outputs"][0]["data"][0].as_str().unwrap(),
            from_json,
            "{model}"
        );
    }
    // The inpainting model lists mask_image in its metadata and needs it.
    let meta = s.get("/v2/models/inpaint").expect(200).json();
    assert!(
        meta["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "mask_image")
    );
    for body in [
        json_request(&image, json!({})),
        prompt_request("a", json!({})),
    ] {
        let e = s.infer("inpaint", &body).expect(400).error();
        assert!(e.contains("this is an inpainting model"), "{e}");
    }
    let e = s
        .infer("tiny", &{
            let mut r = prompt_request("a", json!({}));
            r["inputs"].as_array_mut().unwrap().push(json!({"name": "mask_image", "shape": [1],
                "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": [b64(&mask)]}));
            r
        })
        .expect(400)
        .error();
    assert!(e.contains("'mask_image' needs an 'image'"), "{e}");
    // SDXL inpaints as StableDiffusionXLInpaintPipeline: strength 0.9999 by default.
    let v = s
        .infer("xl", &inpaint_request(&image, &mask, params.clone()))
        .expect(200)
        .json();
    assert_eq!(image_sizes(&v), vec![(64, 64)]);
    assert_eq!(v["parameters"]["strength"], json!(0.9999));
    assert_eq!(
        v["parameters"]["steps_run"],
        json!(3),
        "int(4 × 0.9999) = 3"
    );
}
