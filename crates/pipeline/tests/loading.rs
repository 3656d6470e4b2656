//! Loading real folders and broken copies of them: every failure is an error that names the
//! file and the key or tensor at fault, never a panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::weights::find_weights;
use sdserve_pipeline::{LoadOptions, StableDiffusion};
use serde_json::{Map, Value, json};
use tempfile::TempDir;

use common::max_abs;

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A scratch copy of a tiny model.
fn copy_model(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&model_dir(name), &dir);
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load(dir, LoadOptions::cpu()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => {
            println!("{e}");
            e.to_string()
        }
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "error does not mention {part:?}: {msg}");
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors header in place, keeping the data section as it is.
fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";

#[test]
fn tiny_models_load() {
    for name in ["tiny-sd1", "tiny-sd2"] {
        StableDiffusion::load(&model_dir(name), LoadOptions::cpu())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn missing_weight_file() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    std::fs::remove_file(dir.join(UNET_WEIGHTS)).unwrap();
    assert_mentions(&load_err(&dir), &[UNET_WEIGHTS, "not found"]);
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    let path = dir.join(VAE_WEIGHTS);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_mentions(&load_err(&dir), &[VAE_WEIGHTS, "tensor `", "truncated"]);

    // Shorter than the 8-byte length prefix.
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert_mentions(&load_err(&dir), &[VAE_WEIGHTS, "too short"]);
}

#[test]
fn malicious_header_length_is_refused_before_allocating() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    let path = dir.join(VAE_WEIGHTS);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(&load_err(&dir), &[VAE_WEIGHTS, "header length"]);

    // A plausible length over garbage.
    bytes[..8].copy_from_slice(&64u64.to_le_bytes());
    bytes[8..72].fill(b'#');
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_err(&dir),
        &[VAE_WEIGHTS, "corrupt safetensors header"],
    );
}

#[test]
fn offsets_beyond_the_file_name_the_tensor() {
    let (_tmp, dir) = copy_model("tiny-sd2");
    edit_header(&dir.join(UNET_WEIGHTS), |h| {
        h["conv_in.bias"]["data_offsets"] = json!([0, u64::MAX / 2]);
    });
    assert_mentions(
        &load_err(&dir),
        &[UNET_WEIGHTS, "`conv_in.bias`", "outside"],
    );
}

#[test]
fn wrong_tensor_shape_names_file_and_tensor() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    // Same byte size, different shape.
    edit_header(&dir.join(UNET_WEIGHTS), |h| {
        h["conv_in.weight"]["shape"] = json!([32, 4, 9, 1])
    });
    assert_mentions(
        &load_err(&dir),
        &[
            UNET_WEIGHTS,
            "`conv_in.weight`",
            "[32, 4, 9, 1]",
            "[32, 4, 3, 3]",
        ],
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_the_tensor() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["block_out_channels"] = json!([64, 64])
    });
    assert_mentions(
        &load_err(&dir),
        &[
            UNET_WEIGHTS,
            "`conv_in.weight`",
            "[32, 4, 3, 3]",
            "[64, 4, 3, 3]",
        ],
    );
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    let name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    edit_header(&dir.join(UNET_WEIGHTS), |h| {
        h.remove(name).unwrap();
    });
    assert_mentions(&load_err(&dir), &[UNET_WEIGHTS, name, "missing"]);
}

#[test]
fn unsupported_scheduler_class() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join("scheduler/scheduler_config.json"), |c| {
        c["_class_name"] = json!("KDPM2DiscreteScheduler");
    });
    assert_mentions(
        &load_err(&dir),
        &["scheduler/scheduler_config.json", "KDPM2DiscreteScheduler"],
    );
}

#[test]
fn unsupported_unet_config_keys() {
    for (key, value) in [
        ("addition_embed_type", json!("image")),
        ("time_cond_proj_dim", json!(256)),
        ("class_embed_type", json!("timestep")),
        ("only_cross_attention", json!(true)),
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
        ("transformer_layers_per_block", json!([[1, 2], [1, 2]])),
        (
            "down_block_types",
            json!(["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
        ),
    ] {
        let (_tmp, dir) = copy_model("tiny-sd1");
        edit_json(&dir.join("unet/config.json"), |c| c[key] = value.clone());
        assert_mentions(&load_err(&dir), &["unet/config.json", key]);
    }
}

#[test]
fn unsupported_vae_and_text_encoder_keys() {
    let (_tmp, dir) = copy_model("tiny-sd2");
    edit_json(&dir.join("vae/config.json"), |c| {
        c["shift_factor"] = json!(0.0609)
    });
    assert_mentions(&load_err(&dir), &["vae/config.json", "shift_factor"]);

    let (_tmp, dir) = copy_model("tiny-sd2");
    edit_json(&dir.join("text_encoder/config.json"), |c| {
        c["hidden_act"] = json!("relu")
    });
    assert_mentions(&load_err(&dir), &["text_encoder/config.json", "hidden_act"]);

    let (_tmp, dir) = copy_model("tiny-sd2");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["cross_attention_dim"] = json!(64)
    });
    assert_mentions(
        &load_err(&dir),
        &["unet/config.json", "cross_attention_dim"],
    );
}

#[test]
fn pickle_only_folder_is_refused_with_a_conversion_hint() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    std::fs::remove_file(dir.join("text_encoder/model.safetensors")).unwrap();
    std::fs::write(
        dir.join("text_encoder/pytorch_model.bin"),
        b"PK\x03\x04 not really",
    )
    .unwrap();
    assert_mentions(
        &load_err(&dir),
        &["text_encoder", "pytorch_model.bin", "pickle", "safetensors"],
    );
}

#[test]
fn not_a_stable_diffusion_folder() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join("model_index.json"), |c| {
        c["_class_name"] = json!("StableDiffusionXLPipeline")
    });
    // An SD folder called SDXL lacks SDXL's second text encoder.
    assert_mentions(
        &load_err(&dir),
        &["model_index.json", "text_encoder_2", "missing component"],
    );

    edit_json(&dir.join("model_index.json"), |c| {
        c["_class_name"] = json!("StableDiffusion3Pipeline")
    });
    assert_mentions(
        &load_err(&dir),
        &["model_index.json", "StableDiffusion3Pipeline"],
    );

    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    assert_mentions(&load_err(&dir), &["model_index.json", "not found"]);

    std::fs::write(dir.join("model_index.json"), "{not json").unwrap();
    assert_mentions(&load_err(&dir), &["model_index.json", "invalid JSON"]);
}

#[test]
fn malformed_config_names_file_and_key() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["layers_per_block"] = json!("two")
    });
    assert_mentions(&load_err(&dir), &["unet/config.json", "layers_per_block"]);

    std::fs::write(dir.join("unet/config.json"), "[1, 2").unwrap();
    assert_mentions(&load_err(&dir), &["unet/config.json", "invalid JSON"]);
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A probe of the UNet on fixed inputs, to compare differently stored copies of one model.
fn unet_probe(sd: &StableDiffusion) -> Tensor {
    let x = Tensor::arange(0f32, 2.0 * 4.0 * 64.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 4, 8, 8))
        .unwrap();
    let x = ((x / 256.0).unwrap().sin().unwrap() * 2.0).unwrap();
    let ctx = sd.encode_prompts(&["a red circle", ""]).unwrap();
    let cond = sdserve_pipeline::conditioning::Conditioning::new(ctx);
    sd.unet().forward(&x, 500.0, &cond).unwrap()
}

#[test]
fn sharded_fp16_and_prefixed_weights_load_like_the_original() {
    let original = StableDiffusion::load(&model_dir("tiny-sd1"), LoadOptions::cpu()).unwrap();
    let expected = unet_probe(&original);

    // Sharded UNet: two shards and an index.
    let (_tmp, dir) = copy_model("tiny-sd1");
    let all = tensors(&dir.join(UNET_WEIGHTS));
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = Map::new();
    for (shard, part) in [
        ("diffusion_pytorch_model-00001-of-00002.safetensors", first),
        ("diffusion_pytorch_model-00002-of-00002.safetensors", second),
    ] {
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.join("unet").join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), json!(shard));
        }
    }
    std::fs::remove_file(dir.join(UNET_WEIGHTS)).unwrap();
    let index = dir.join("unet/diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::to_string(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let sharded = StableDiffusion::load(&dir, LoadOptions::cpu()).unwrap();
    assert_eq!(max_abs(&unet_probe(&sharded), &expected), 0.0);

    // A shard the index names but the folder lacks.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"))
        .unwrap();
    assert_mentions(
        &load_err(&dir),
        &[
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            "index.json",
        ],
    );

    // Only an fp16 variant: loaded and upcast on the CPU.
    let (_tmp, dir) = copy_model("tiny-sd1");
    let half: HashMap<String, Tensor> = tensors(&dir.join(UNET_WEIGHTS))
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    let fp16 = dir.join("unet/diffusion_pytorch_model.fp16.safetensors");
    candle_core::safetensors::save(&half, &fp16).unwrap();
    std::fs::remove_file(dir.join(UNET_WEIGHTS)).unwrap();
    let from_half = StableDiffusion::load(&dir, LoadOptions::cpu()).unwrap();
    let d = max_abs(&unet_probe(&from_half), &expected);
    assert!(
        d > 0.0 && d < 0.05,
        "fp16 weights moved the UNet output by {d}"
    );

    // Both present: F32 runs prefer the full-precision file, reduced precision the fp16 one.
    std::fs::copy(
        model_dir("tiny-sd1").join(UNET_WEIGHTS),
        dir.join(UNET_WEIGHTS),
    )
    .unwrap();
    let unet = dir.join("unet");
    assert_eq!(
        find_weights(&unet, "diffusion_pytorch_model", false)
            .unwrap()
            .files,
        [dir.join(UNET_WEIGHTS)]
    );
    assert_eq!(
        find_weights(&unet, "diffusion_pytorch_model", true)
            .unwrap()
            .files,
        std::slice::from_ref(&fp16)
    );
    std::fs::write(&fp16, b"broken").unwrap();
    StableDiffusion::load(&dir, LoadOptions::cpu()).unwrap();

    // transformers 4.x names text encoder tensors `text_model.*`.
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_header(&dir.join("text_encoder/model.safetensors"), |h| {
        let entries: Vec<(String, Value)> = std::mem::take(h).into_iter().collect();
        for (k, v) in entries {
            let k = if k == "__metadata__" {
                k
            } else {
                format!("text_model.{k}")
            };
            h.insert(k, v);
        }
    });
    let prefixed = StableDiffusion::load(&dir, LoadOptions::cpu()).unwrap();
    let a = prefixed.encode_prompts(&["a red circle"]).unwrap();
    let b = original.encode_prompts(&["a red circle"]).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
}

#[test]
fn load_options_from_model_settings() {
    let extra = json!({"device": "cpu", "dtype": "f32"});
    let options = LoadOptions::from_extra(extra.as_object().unwrap()).unwrap();
    assert_eq!(options, LoadOptions::cpu());
    let err = LoadOptions::from_extra(json!({"dtype": "fp8"}).as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["parameters.extra.dtype", "fp8"]);
}

// ---- untrusted model files: malicious safetensors headers and absurd config values ----------

/// Writes a safetensors file whose first 8 bytes announce `header_len`, over real data.
fn with_header_length(path: &Path, header_len: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[..8].copy_from_slice(&header_len.to_le_bytes());
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn header_lengths_beyond_the_file_are_refused() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    let path = dir.join(VAE_WEIGHTS);
    let len = std::fs::metadata(&path).unwrap().len();
    for announced in [1u64 << 63, u64::MAX, len - 7, len] {
        copy_dir(&model_dir("tiny-sd1").join("vae"), &dir.join("vae"));
        with_header_length(&path, announced);
        assert_mentions(
            &load_err(&dir),
            &[VAE_WEIGHTS, "header length", &announced.to_string()],
        );
    }
}

#[test]
fn overlapping_tensors_are_refused() {
    let (_tmp, dir) = copy_model("tiny-sd1");
    let mut victim = String::new();
    edit_header(&dir.join(VAE_WEIGHTS), |h| {
        // Two tensors of the same byte size: the second one is pointed at the first one's bytes.
        let mut by_size: HashMap<u64, String> = HashMap::new();
        let mut names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
        names.sort();
        for name in names {
            let o = &h[&name]["data_offsets"];
            let size = o[1].as_u64().unwrap() - o[0].as_u64().unwrap();
            if let Some(first) = by_size.get(&size) {
                let offsets = h[first]["data_offsets"].clone();
                h[&name]["data_offsets"] = offsets;
                victim = name;
                return;
            }
            by_size.insert(size, name);
        }
        panic!("no two tensors of the same size");
    });
    assert_mentions(&load_err(&dir), &[VAE_WEIGHTS, "overlap"]);
    let _ = victim;
}

#[test]
fn tensor_entries_that_lie_are_refused() {
    let tensor = "decoder.conv_in.weight";
    let cases: [(&str, Value, &[&str]); 7] = [
        ("data_offsets", json!([9472, 256]), &["outside"]),
        ("data_offsets", json!([0, u64::MAX]), &["outside"]),
        ("data_offsets", json!([-1, 256]), &["data_offsets"]),
        ("dtype", json!("F16"), &["needs", "bytes"]),
        ("dtype", json!("F128"), &["unknown dtype"]),
        ("shape", json!([1u64 << 62, 1u64 << 62]), &["overflows"]),
        ("shape", json!([-64, 4, 3, 3]), &["shape"]),
    ];
    for (key, value, expected) in cases {
        let (_tmp, dir) = copy_model("tiny-sd1");
        edit_header(&dir.join(VAE_WEIGHTS), |h| h[tensor][key] = value.clone());
        let err = load_err(&dir);
        assert_mentions(&err, &[VAE_WEIGHTS, tensor]);
        assert_mentions(&err, expected);
    }
    // A header that is JSON but not a map of tensors.
    for header in [
        json!([1, 2, 3]),
        json!({"w": 5}),
        json!({"w": {"dtype": "F32"}}),
    ] {
        let (_tmp, dir) = copy_model("tiny-sd1");
        let path = dir.join(VAE_WEIGHTS);
        let text = header.to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        std::fs::write(&path, bytes).unwrap();
        assert_mentions(&load_err(&dir), &[VAE_WEIGHTS]);
    }
}

/// Peak resident memory of this test process, in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[test]
fn absurd_config_values_are_errors_not_panics_or_giant_allocations() {
    let unet = "unet/config.json";
    let vae = "vae/config.json";
    let text = "text_encoder/config.json";
    let scheduler = "scheduler/scheduler_config.json";
    let cases: Vec<(&str, &str, Value)> = vec![
        (unet, "block_out_channels", json!([1e12, 1e12])),
        (
            unet,
            "block_out_channels",
            json!([1_000_000_000_000u64, 1_000_000_000_000u64]),
        ),
        (unet, "block_out_channels", json!([u64::MAX, 64])),
        (unet, "sample_size", json!(0)),
        (unet, "sample_size", json!(1_000_000_000u64)),
        (unet, "sample_size", json!([8, u64::MAX])),
        (unet, "layers_per_block", json!(1_000_000)),
        (unet, "transformer_layers_per_block", json!(1_000_000)),
        (unet, "cross_attention_dim", json!(1u64 << 40)),
        (unet, "norm_num_groups", json!(1u64 << 40)),
        (unet, "in_channels", json!(1u64 << 40)),
        (
            unet,
            "down_block_types",
            json!(vec!["DownBlock2D"; 100_000]),
        ),
        (vae, "block_out_channels", json!(vec![32; 70])),
        (vae, "latent_channels", json!(1u64 << 40)),
        (vae, "layers_per_block", json!(1_000_000)),
        (text, "num_hidden_layers", json!(1_000_000)),
        (text, "vocab_size", json!(1u64 << 40)),
        (text, "hidden_size", json!(1u64 << 40)),
        (text, "max_position_embeddings", json!(1u64 << 40)),
        (text, "intermediate_size", json!(1u64 << 40)),
        (text, "num_attention_heads", json!(1u64 << 40)),
    ];
    for (file, key, value) in cases {
        let (_tmp, dir) = copy_model("tiny-sd1");
        edit_json(&dir.join(file), |c| c[key] = value.clone());
        let err = load_err(&dir);
        assert!(
            err.contains(file) && err.contains(key),
            "{file} {key}={value}: {err}"
        );
    }
    // The scheduler config is read per request: an absurd value fails every generation with
    // the file and key named, before any schedule is allocated.
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join(scheduler), |c| {
        c["num_train_timesteps"] = json!(1_000_000_000_000u64)
    });
    let err = match StableDiffusion::load(&dir, LoadOptions::cpu()) {
        Err(e) => e.to_string(),
        Ok(sd) => {
            use sdserve_generation::{Generator, ImageSpec, Job, JobSettings, RunToEnd};
            let job = Job {
                settings: JobSettings {
                    num_inference_steps: 2,
                    guidance_scale: 7.5,
                    height: 64,
                    width: 64,
                    scheduler: sd.description().default_scheduler.clone(),
                    eta: 0.0,
                    time_ids: None,
                    image_to_image: None,
                    adapters: sdserve_generation::AdapterChoice::none(),
                },
                images: vec![ImageSpec::new("a cat", 1)],
            };
            sd.generate(&job, &mut RunToEnd).unwrap_err().to_string()
        }
    };
    assert_mentions(&err, &["num_train_timesteps"]);

    // A config file too large to be real is not read into memory.
    let (_tmp, dir) = copy_model("tiny-sd1");
    let path = dir.join(unet);
    let mut padded = std::fs::read(&path).unwrap();
    padded.resize(17 << 20, b' ');
    std::fs::write(&path, padded).unwrap();
    assert_mentions(&load_err(&dir), &[unet, "at most"]);
    // Every refusal came before anything big was allocated and touched.
    let peak = peak_rss_mib();
    assert!(peak < 2048, "peak RSS {peak} MiB");
}

#[test]
fn sdxl_components_are_checked_against_each_other() {
    // An SD 1.x folder whose UNet asks for SDXL's added conditioning.
    let (_tmp, dir) = copy_model("tiny-sd1");
    edit_json(&dir.join("unet/config.json"), |c| {
        c.insert("addition_embed_type".into(), json!("text_time"));
        c.insert("addition_time_embed_dim".into(), json!(8));
        c.insert("projection_class_embeddings_input_dim".into(), json!(80));
    });
    assert_mentions(
        &load_err(&dir),
        &[
            "unet/config.json",
            "addition_embed_type",
            "StableDiffusionPipeline",
        ],
    );

    // An SDXL UNet whose added embedding does not fit the second encoder's projection.
    let (_tmp, dir) = copy_model("tiny-sdxl");
    edit_json(&dir.join("unet/config.json"), |c| {
        c["projection_class_embeddings_input_dim"] = json!(81)
    });
    assert_mentions(
        &load_err(&dir),
        &["projection_class_embeddings_input_dim", "81", "= 80"],
    );

    // An SDXL UNet without it, and an SDXL folder without its second encoder.
    let (_tmp, dir) = copy_model("tiny-sdxl");
    edit_json(&dir.join("unet/config.json"), |c| {
        c.remove("addition_embed_type");
    });
    assert_mentions(&load_err(&dir), &["addition_embed_type", "SDXL"]);
    let (_tmp, dir) = copy_model("tiny-sdxl");
    edit_json(&dir.join("model_index.json"), |c| {
        c.remove("text_encoder_2");
    });
    assert_mentions(&load_err(&dir), &["model_index.json", "text_encoder_2"]);
}

#[test]
fn sdxl_vae_decodes_in_f32_unless_it_is_an_fp16_fix() {
    let f16 = || {
        let extra = serde_json::from_value(json!({"device": "cpu", "dtype": "f16"})).unwrap();
        LoadOptions::from_extra(&extra).unwrap()
    };
    let (_tmp, dir) = copy_model("tiny-sdxl");
    let sd = StableDiffusion::load(&dir, f16()).unwrap();
    assert_eq!((sd.dtype(), sd.vae().dtype()), (DType::F16, DType::F32));
    // An fp16-fix VAE, and SD 1.x pipelines (which never upcast), decode in the model's dtype.
    edit_json(&dir.join("vae/config.json"), |c| {
        c["force_upcast"] = json!(false)
    });
    let sd = StableDiffusion::load(&dir, f16()).unwrap();
    assert_eq!(sd.vae().dtype(), DType::F16);
    let sd = StableDiffusion::load(&model_dir("tiny-sd1"), f16()).unwrap();
    assert_eq!(sd.vae().dtype(), DType::F16);
}
