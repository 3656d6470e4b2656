//! SDXL folders through the real binary: the tiny SDXL model served over REST with its own
//! inputs (second prompts, size and crop conditioning), their 400s on an SD 1.x model, the
//! metadata that names them, an SDXL refiner that only refines images, and a half-refiner
//! folder refused at startup. (gRPC: the
//! `tritonclient.grpc` tests in `tests/python/grpc`, run by `clients.rs`.)

use std::path::PathBuf;
use std::time::Duration;

use sdserve_tests::*;

fn tiny_sdxl() -> PathBuf {
    workspace_root()
        .join("models/tiny-sdxl")
        .canonicalize()
        .expect("models/tiny-sdxl")
}

/// A repository with the tiny SDXL model as `xl` and the tiny SD 1.x model as `sd1`.
fn serve() -> (Repo, Server) {
    let repo = Repo::new();
    let mut xl = tiny_settings("xl", None);
    xl["parameters"]["uri"] = json!(tiny_sdxl());
    repo.model("xl", xl);
    repo.tiny("sd1");
    let server = launch(&repo).start();
    (repo, server)
}

fn png(v: &Value, i: usize) -> String {
    v["outputs"][0]["data"][i]
        .as_str()
        .expect("base64 image")
        .to_owned()
}

#[test]
fn sdxl_inputs_reach_the_pipeline() {
    let (_repo, s) = serve();
    let base = json!({"seed": 3, "height": 64, "width": 48});
    let image = |extra: Value| {
        let mut parameters = base.clone();
        parameters
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let v = s
            .infer("xl", &prompt_request("a red circle", parameters))
            .expect(200)
            .json();
        assert_eq!(image_sizes(&v), vec![(48, 64)]);
        png(&v, 0)
    };
    let plain = image(json!({}));
    // The defaults, given explicitly, change nothing.
    let explicit = image(json!({"original_size": [64, 48], "target_size": [64, 48],
                                "crops_coords_top_left": [0, 0], "prompt_2": "a red circle"}));
    assert_eq!(plain, explicit);
    // Each SDXL input changes the picture.
    for extra in [
        json!({"prompt_2": "three white circles"}),
        json!({"negative_prompt": "blurry"}),
        json!({"negative_prompt": "blurry", "negative_prompt_2": "dark"}),
        json!({"original_size": [512, 512]}),
        json!({"crops_coords_top_left": [16, 0]}),
        json!({"target_size": [1024, 1024]}),
        json!({"negative_original_size": [256, 256], "negative_target_size": [256, 256]}),
    ] {
        assert_ne!(image(extra.clone()), plain, "{extra} changed nothing");
    }

    // As inputs, in one request of two prompts with one prompt_2 each.
    let body = json!({
        "inputs": [
            {"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "prompt_2", "shape": [2], "datatype": "BYTES", "data": ["c", "d"]},
            {"name": "target_size", "shape": [2], "datatype": "INT64", "data": [64, 64]}
        ],
        "parameters": {"seed": 1}
    });
    let v = s.infer("xl", &body).expect(200).json();
    assert_eq!(image_sizes(&v), vec![(64, 64), (64, 64)]);
}

#[test]
fn sdxl_inputs_are_checked_and_named() {
    let (_repo, s) = serve();
    let cases = [
        (
            "sd1",
            json!({"prompt_2": "x"}),
            "'prompt_2' only applies to SDXL models",
        ),
        (
            "sd1",
            json!({"target_size": [64, 64]}),
            "'target_size' only applies to SDXL models",
        ),
        (
            "xl",
            json!({"original_size": [64]}),
            "parameter 'original_size' must hold two integers",
        ),
        (
            "xl",
            json!({"crops_coords_top_left": [-1, 0]}),
            "'crops_coords_top_left' holds -1",
        ),
        (
            "xl",
            json!({"prompt_2": ["a", "b", "c"]}),
            "'prompt_2' has 3 element(s)",
        ),
    ];
    for (model, parameters, message) in cases {
        let r = s.infer(model, &prompt_request("a cat", parameters.clone()));
        r.expect(400);
        assert!(
            r.error().contains(message),
            "{model} {parameters}: {} lacks {message:?}",
            r.error()
        );
    }
}

#[test]
fn metadata_reports_the_family_and_sdxl_inputs() {
    let (_repo, s) = serve();
    let xl = s.get("/v2/models/xl").expect(200).json();
    assert_eq!(xl["parameters"]["family"], "sdxl");
    assert_eq!(xl["parameters"]["dtype"], "f32");
    let names = |v: &Value| -> Vec<String> {
        v["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for name in [
        "prompt_2",
        "negative_prompt_2",
        "original_size",
        "target_size",
    ] {
        assert!(names(&xl).iter().any(|n| n == name), "{name} missing: {xl}");
    }
    let sd1 = s.get("/v2/models/sd1").expect(200).json();
    assert_eq!(sd1["parameters"]["family"], "sd1");
    assert!(!names(&sd1).iter().any(|n| n == "prompt_2"), "{sd1}");
}

/// A folder without the first text encoder that does not say `requires_aesthetics_score`: no
/// diffusers pipeline runs it as it stands.
#[test]
fn a_half_refiner_folder_is_refused_at_startup_naming_the_keys() {
    let repo = Repo::new();
    let folder = repo.assets().join("refiner");
    std::fs::create_dir_all(&folder).unwrap();
    for entry in ["scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"] {
        std::os::unix::fs::symlink(tiny_sdxl().join(entry), folder.join(entry)).unwrap();
    }
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(tiny_sdxl().join("model_index.json")).unwrap())
            .unwrap();
    index["_class_name"] = json!("StableDiffusionXLImg2ImgPipeline");
    index["text_encoder"] = json!([null, null]);
    index["tokenizer"] = json!([null, null]);
    index["requires_aesthetics_score"] = json!(false);
    std::fs::write(folder.join("model_index.json"), index.to_string()).unwrap();
    let mut settings = tiny_settings("refiner", None);
    settings["parameters"]["uri"] = json!(folder);
    repo.model("refiner", settings);

    let exit = launch(&repo).run_to_exit(Duration::from_secs(60));
    assert!(
        !exit.status.success(),
        "the server started with a half refiner"
    );
    let log = format!("{}{}", exit.stdout, exit.stderr);
    for needle in ["refiner", "text_encoder", "requires_aesthetics_score"] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
}

#[test]
fn a_refiner_refines_images_with_aesthetic_scores_and_refuses_text_to_image() {
    let repo = Repo::new();
    let mut settings = tiny_settings("refiner", None);
    settings["parameters"]["uri"] = json!(workspace_root().join("models/tiny-sdxl-refiner"));
    repo.model("refiner", settings);
    let s = launch(&repo).start();
    let picture =
        std::fs::read(workspace_root().join("models/reference/sdxl/euler_0.png")).unwrap();
    let request = |parameters: Value| {
        json!({"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red circle"]},
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
             "data": [base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &picture)]}],
         "parameters": parameters})
    };
    let refine = |parameters: Value| {
        let v = s.infer("refiner", &request(parameters)).expect(200).json();
        assert_eq!(image_sizes(&v), vec![(64, 64)]);
        assert_eq!(
            v["parameters"]["strength"],
            json!(0.3),
            "SDXL image-to-image's default"
        );
        png(&v, 0)
    };
    let base = json!({"seed": 1, "num_inference_steps": 10});
    let plain = refine(base.clone());
    let explicit = refine(json!({"seed": 1, "num_inference_steps": 10,
                                 "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}));
    assert_eq!(
        plain, explicit,
        "the defaults, given explicitly, change nothing"
    );
    assert_ne!(
        refine(json!({"seed": 1, "num_inference_steps": 10, "aesthetic_score": 9.0})),
        plain
    );
    let meta = s.get("/v2/models/refiner").expect(200).json();
    assert_eq!(meta["parameters"]["family"], "sdxl-refiner");
    assert!(
        meta["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "aesthetic_score")
    );
    let e = s
        .infer("refiner", &prompt_request("a", json!({})))
        .expect(400)
        .error();
    assert!(e.contains("only refines images"), "{e}");
    let mut masked = request(json!({}));
    masked["inputs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "mask_image", "shape": [1],
        "datatype": "BYTES", "parameters": {"content_type": "base64"},
        "data": [base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &picture)]}));
    let e = s.infer("refiner", &masked).expect(400).error();
    assert!(e.contains("does not serve inpainting"), "{e}");
}
