//! LoRA adapters through the real binary: declared in model-settings.json, listed in model
//! metadata, chosen per request; concurrent requests with different adapters on two workers
//! with batching give exactly the images each gives alone; unknown names are 400s before
//! anything is queued; hostile adapter files fail the model's load naming the file.

use std::path::PathBuf;

use sdserve_tests::*;

fn models(rel: &str) -> PathBuf {
    workspace_root()
        .join("models")
        .join(rel)
        .canonicalize()
        .unwrap_or_else(|e| panic!("models/{rel}: {e}"))
}

/// `name` served from the tiny SD 1.x model with `lora` as `parameters.extra.lora`, batching
/// up to 4 images for 0.4 s.
fn sd1_with(repo: &Repo, name: &str, lora: Value) {
    let mut settings = tiny_settings(name, None);
    settings["parameters"]["uri"] = json!(models("tiny-sd1"));
    settings["parameters"]["extra"]["lora"] = lora;
    settings["max_batch_size"] = json!(4);
    settings["max_batch_time"] = json!(0.4);
    repo.model(name, settings);
}

fn image(s: &Server, model: &str, parameters: Value) -> String {
    let v = s
        .infer(model, &prompt_request("a red circle", parameters))
        .expect(200)
        .json();
    v["outputs"][0]["data"][0]
        .as_str()
        .expect("base64 image")
        .to_owned()
}

fn batches(s: &Server, model: &str) -> (f64, f64) {
    let m = s.scrape();
    let labels = [("model", model)];
    (
        m.value("sdserve_batch_images_count", &labels),
        m.value("sdserve_batch_images_sum", &labels),
    )
}

#[test]
fn adapters_are_chosen_per_request_and_never_leak_between_concurrent_batches() {
    let repo = Repo::new();
    // A relative path is relative to model-settings.json.
    let style = repo.write(
        "sd1/adapters/style.safetensors",
        std::fs::read(models("lora/sd1/style.safetensors")).unwrap(),
    );
    assert!(style.is_file());
    sd1_with(
        &repo,
        "sd1",
        json!({
            "style": {"path": "adapters/style.safetensors"},
            "detail": {"path": models("lora/sd1/detail.safetensors"), "scale": 0.5}
        }),
    );
    sd1_with(
        &repo,
        "styled",
        json!({"style": {"path": models("lora/sd1/style.safetensors"), "scale": 0.8, "default": true}}),
    );
    let s = launch(&repo).args(["--parallel-workers", "2"]).start();

    let meta = s.get("/v2/models/sd1").expect(200).json();
    let mut listed = meta["parameters"]["lora"].as_array().unwrap().clone();
    listed.sort_by_key(|a| a["name"].as_str().unwrap().to_owned());
    assert_eq!(
        listed,
        [
            json!({"name": "detail", "scale": 0.5, "default": false}),
            json!({"name": "style", "scale": 1.0, "default": false})
        ]
    );

    let sets = [
        json!({}),
        json!({"style": 1.0}),
        json!({"style": 0.8, "detail": 0.3}),
        json!({"detail": null}),
    ];
    let params = |lora: &Value| json!({"seed": 7, "lora": lora});
    let alone: Vec<String> = sets.iter().map(|l| image(&s, "sd1", params(l))).collect();
    for i in 0..sets.len() {
        for j in 0..i {
            assert_ne!(
                alone[i], alone[j],
                "{} and {} gave one image",
                sets[i], sets[j]
            );
        }
    }
    // No parameter and an empty object are the base model (sd1 has no default adapter);
    // a zero scale is no adapter; a missing scale is the declared one.
    assert_eq!(image(&s, "sd1", json!({"seed": 7})), alone[0]);
    assert_eq!(image(&s, "sd1", params(&json!({"style": 0.0}))), alone[0]);
    assert_eq!(image(&s, "sd1", params(&json!({"detail": 0.5}))), alone[3]);
    // gRPC clients send the object as JSON text.
    assert_eq!(
        image(&s, "sd1", params(&json!(r#"{"style": 1.0}"#))),
        alone[1]
    );

    // Every set twice at once, on two workers that batch equal sets.
    let (count_before, sum_before) = batches(&s, "sd1");
    let concurrent: Vec<(usize, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2 * sets.len())
            .map(|k| {
                let (s, i) = (&s, k % sets.len());
                let body = params(&sets[i]);
                scope.spawn(move || (i, image(s, "sd1", body)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, png) in &concurrent {
        assert_eq!(png, &alone[*i], "adapters {} under concurrency", sets[*i]);
    }
    let (count, sum) = batches(&s, "sd1");
    assert_eq!(sum - sum_before, 8.0);
    assert!(
        count - count_before < 8.0,
        "no two requests shared a batch ({} batches)",
        count - count_before
    );

    // A model with a default adapter applies it unless the request chooses.
    let styled = |lora: Option<Value>| {
        let mut p = json!({"seed": 7});
        if let Some(l) = lora {
            p["lora"] = l;
        }
        image(&s, "styled", p)
    };
    assert_eq!(styled(None), styled(Some(json!({"style": 0.8}))));
    assert_eq!(styled(Some(json!({}))), alone[0]);
    assert_eq!(styled(Some(json!({"style": 1.0}))), alone[1]);

    // Unknown adapters, bad scales, too many: 400s naming the parameter; nothing ran.
    let (count_before, _) = batches(&s, "sd1");
    for (lora, needle) in [
        (json!({"pixel-art": 0.8}), "unknown adapter 'pixel-art'"),
        (json!({"style": 11}), "the scale of 'style'"),
        (json!({"style": "high"}), "the scale of 'style'"),
        (json!(["style"]), "must be an object"),
    ] {
        let r = s.infer("sd1", &prompt_request("a", params(&lora)));
        r.expect(400);
        let e = r.error();
        assert!(e.contains("lora") && e.contains(needle), "{lora}: {e}");
    }
    let too_many: serde_json::Map<String, Value> =
        (0..9).map(|i| (format!("a{i}"), json!(1.0))).collect();
    let e = s
        .infer(
            "sd1",
            &prompt_request("a", params(&Value::Object(too_many))),
        )
        .expect(400)
        .error();
    assert!(e.contains("at most 8"), "{e}");
    let m = s.scrape();
    assert_eq!(m.value("sdserve_queue_depth", &[]), 0.0);
    assert_eq!(batches(&s, "sd1").0, count_before);

    // Unloading frees the model with its adapters; loading reads them again.
    s.post("/v2/repository/models/sd1/unload", &json!({}))
        .expect(200);
    s.get("/v2/models/sd1").expect(404);
    s.post("/v2/repository/models/sd1/load", &json!({}))
        .expect(200);
    assert_eq!(image(&s, "sd1", params(&sets[2])), alone[2]);
}

#[test]
fn hostile_adapter_files_fail_the_load_naming_the_file() {
    let repo = Repo::new();
    let style = models("lora/sd1/style.safetensors");
    let bytes = std::fs::read(&style).unwrap();
    let truncated = repo.write("files/truncated.safetensors", &bytes[..bytes.len() / 2]);
    let pickle = repo.write("files/adapter.ckpt", b"\x80\x04K\x01.");
    let nowhere = repo.path().join("files/nowhere.safetensors");
    // A real layer's pair with a fan-in of 5 where the layer has 32.
    let wrong_shapes = repo.write(
        "files/shapes.safetensors",
        safetensors(&[
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                &[4, 5],
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                &[32, 4],
            ),
        ]),
    );
    // (model, adapter file, what the error must say besides the file's name)
    let cases = [
        ("truncated", truncated, ""),
        ("pickle", pickle, "pickle"),
        // The tiny SDXL model's adapter adapts a second text encoder SD 1.x lacks.
        (
            "family",
            models("lora/sdxl/style.safetensors"),
            "text_encoder_2",
        ),
        ("missing", nowhere, ""),
        ("shapes", wrong_shapes, "do not fit"),
    ];
    for (name, path, _) in &cases {
        sd1_with(&repo, name, json!({"bad": {"path": path}}));
    }
    sd1_with(&repo, "good", json!({"style": {"path": style}}));
    let s = launch(&repo)
        .args(["--load-models-at-startup", "false"])
        .no_wait_ready()
        .start();
    for (name, path, needle) in &cases {
        let r = s.post(&format!("/v2/repository/models/{name}/load"), &json!({}));
        assert!(r.status >= 400, "{name}: loading answered {}", r.status);
        let e = r.error();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(file) && e.contains(needle), "{name}: {e}");
        println!("{name}: {e}");
    }
    // The server goes on; a good model with an adapter loads and serves it.
    s.post("/v2/repository/models/good/load", &json!({}))
        .expect(200);
    s.infer(
        "good",
        &prompt_request("a", json!({"lora": {"style": 1.0}})),
    )
    .expect(200);
}

/// A safetensors file of zero-filled F32 tensors.
fn safetensors(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = Value::Object(header).to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.resize(file.len() + offset, 0);
    file
}
