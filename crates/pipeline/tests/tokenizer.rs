//! The CLIP tokenizer against ids recorded from transformers 5.24 / diffusers 0.42:
//! `models/reference/tokens.json` for the tiny models' folders, and
//! `tests/fixtures/tokenizer/expected.json` for folders laid out like real SD 1.5 / 2.1
//! checkpoints, a textual-inversion save, a `tokenizer.json` folder and other settings
//! (regenerate with `tests/fixtures/tokenizer/make_expected.py`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sdserve_pipeline::tokenizer::{ClipTokenizer, TokenizerError};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn bpe_dir() -> PathBuf {
    repo_root().join("models/tiny-sd1/tokenizer")
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("integer id")).expect("u32 id"))
        .collect()
}

/// Compares every prompt and returns a description of each mismatch.
fn compare(
    tok: &ClipTokenizer,
    label: &str,
    cases: &[(String, Vec<u32>, Vec<u32>)],
) -> Vec<String> {
    let mut bad = Vec::new();
    for (prompt, padded, untruncated) in cases {
        let got = tok.encode_padded(prompt);
        if &got != padded {
            bad.push(format!(
                "{label} {prompt:?}: padded\n  want {padded:?}\n  got  {got:?}"
            ));
        }
        let got = tok.encode(prompt);
        if &got != untruncated {
            bad.push(format!(
                "{label} {prompt:?}: untruncated\n  want {untruncated:?}\n  got  {got:?}"
            ));
        }
    }
    bad
}

#[test]
fn matches_reference_tokens_for_tiny_models() {
    let reference = read_json(&repo_root().join("models/reference/tokens.json"));
    let tokenizers = reference["tokenizers"]
        .as_object()
        .expect("tokenizers object");
    assert!(tokenizers.contains_key("sd1") && tokenizers.contains_key("sd2"));
    let mut bad = Vec::new();
    for (key, info) in tokenizers {
        let folder = repo_root().join(info["folder"].as_str().expect("folder"));
        let tok = ClipTokenizer::from_dir(&folder).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tok.max_length() as u64,
            info["model_max_length"].as_u64().unwrap(),
            "{key}"
        );
        assert_eq!(
            u64::from(tok.pad_id()),
            info["pad_token_id"].as_u64().unwrap(),
            "{key}"
        );
        let cases: Vec<_> = info["prompts"]
            .as_array()
            .expect("prompts")
            .iter()
            .map(|p| {
                let prompt = p["prompt"].as_str().expect("prompt").to_owned();
                (prompt, ids(&p["ids"]), ids(&p["untruncated_ids"]))
            })
            .collect();
        assert!(cases.len() > 10, "{key}: too few prompts");
        assert!(cases.iter().all(|(_, padded, _)| padded.len() == 77));
        bad.extend(compare(&tok, key, &cases));
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Builds a tokenizer folder for a fixture variant: its config files plus the CLIP BPE files
/// (as `tokenizer.json` for the variant that ships one).
fn assemble(variant: &str, dest: &Path) {
    let src = fixtures().join(variant);
    for entry in fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "tokenizer.skeleton.json" {
            let mut json = read_json(&entry.path());
            let vocab = read_json(&bpe_dir().join("vocab.json"));
            let merges: Vec<Value> = fs::read_to_string(bpe_dir().join("merges.txt"))
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("#version"))
                .map(|l| {
                    let (a, b) = l.split_once(' ').expect("merge line");
                    json!([a, b])
                })
                .collect();
            json["model"]["vocab"] = vocab;
            json["model"]["merges"] = Value::Array(merges);
            fs::write(
                dest.join("tokenizer.json"),
                serde_json::to_vec(&json).unwrap(),
            )
            .unwrap();
        } else {
            fs::copy(entry.path(), dest.join(&name)).unwrap();
        }
    }
    if !dest.join("tokenizer.json").exists() {
        for name in ["vocab.json", "merges.txt"] {
            fs::copy(bpe_dir().join(name), dest.join(name)).unwrap();
        }
    }
}

#[test]
fn matches_transformers_for_real_sd_layouts_and_variants() {
    let expected = read_json(&fixtures().join("expected.json"));
    let prompts: Vec<String> = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let variants = expected["variants"].as_object().unwrap();
    for name in [
        "sd15",
        "sd21",
        "ti",
        "left",
        "split",
        "addedjson",
        "tokjson",
    ] {
        assert!(variants.contains_key(name), "expected.json lacks {name}");
    }
    let mut bad = Vec::new();
    for (name, v) in variants {
        let dir = tempfile::tempdir().unwrap();
        assemble(name, dir.path());
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tok.max_length() as u64,
            v["model_max_length"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            u64::from(tok.pad_id()),
            v["pad_token_id"].as_u64().unwrap(),
            "{name}"
        );
        let padded = v["ids"].as_array().unwrap();
        let untruncated = v["untruncated_ids"].as_array().unwrap();
        assert_eq!(padded.len(), prompts.len());
        let cases: Vec<_> = prompts
            .iter()
            .zip(padded.iter().zip(untruncated))
            .map(|(p, (a, b))| (p.clone(), ids(a), ids(b)))
            .collect();
        bad.extend(compare(&tok, name, &cases));
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn sd2_pad_token_and_case_rules() {
    let sd1 = ClipTokenizer::from_dir(&repo_root().join("models/tiny-sd1/tokenizer")).unwrap();
    let sd2 = ClipTokenizer::from_dir(&repo_root().join("models/tiny-sd2/tokenizer")).unwrap();
    assert_eq!((sd1.pad_id(), sd2.pad_id()), (49407, 0));
    assert_eq!((sd1.bos_id(), sd1.eos_id()), (49406, 49407));
    // "a photo of a cat", the ids every CLIP tokenizer agrees on.
    assert_eq!(
        sd1.encode("a photo of a cat"),
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    let padded = sd2.encode_padded("a photo of a cat");
    assert_eq!(padded.len(), 77);
    assert_eq!(&padded[..8], &[49406, 320, 1125, 539, 320, 2368, 49407, 0]);
    assert!(padded[7..].iter().all(|&id| id == 0));
    // Truncation keeps BOS first and EOS last.
    let long = sd1.encode_padded(&"word ".repeat(200));
    assert_eq!(long.len(), 77);
    assert_eq!((long[0], long[76]), (49406, 49407));
    assert!(long[1..76].iter().all(|&id| id != 49407));
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// A hand-made folder small enough to reason about: "a", "b", "ab" and their `</w>` forms.
fn synthetic(dir: &Path) {
    write(
        dir,
        "vocab.json",
        r#"{"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab</w>": 4, "b</w>": 5, "a</w>": 6, "ab": 7}"#,
    );
    write(dir, "merges.txt", "#version: 0.2\na b</w>\na b\n");
    write(
        dir,
        "tokenizer_config.json",
        r#"{"model_max_length": 6, "pad_token": "<|endoftext|>"}"#,
    );
}

#[test]
fn synthetic_vocabulary_merges_and_unknown_bytes() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    // Expected values from transformers 5.24 on the same folder.
    assert_eq!(tok.encode("ab"), [0, 4, 1]);
    assert_eq!(tok.encode("Ab"), [0, 4, 1]);
    assert_eq!(tok.encode("abab"), [0, 7, 4, 1]);
    assert_eq!(tok.encode("ba"), [0, 3, 6, 1]);
    assert_eq!(tok.encode("a b"), [0, 6, 5, 1]);
    // Bytes missing from the vocabulary become the unknown token, one per byte.
    assert_eq!(tok.encode("c"), [0, 1, 1]);
    assert_eq!(tok.encode("cab"), [0, 1, 4, 1]);
    assert_eq!(tok.encode_padded("ab ab ab ab ab"), [0, 4, 4, 4, 4, 1]);
    assert_eq!(tok.encode_padded(""), [0, 1, 1, 1, 1, 1]);
}

fn load_err(dir: &Path) -> TokenizerError {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_vocab_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    fs::remove_file(dir.path().join("vocab.json")).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if path.ends_with("vocab.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("vocab.json"), "{err}");
}

#[test]
fn missing_merges_txt_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    fs::remove_file(dir.path().join("merges.txt")).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, TokenizerError::MissingFile { path } if path.ends_with("merges.txt")),
        "{err:?}"
    );
}

#[test]
fn bad_merges_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(dir.path(), "merges.txt", "#version: 0.2\na b</w>\na b c\n");
    let err = load_err(dir.path());
    match &err {
        TokenizerError::BadMerge { path, line, text } => {
            assert!(path.ends_with("merges.txt"));
            assert_eq!((*line, text.as_str()), (3, "a b c"));
        }
        other => panic!("expected BadMerge, got {other:?}"),
    }
    assert!(
        err.to_string().contains("merges.txt") && err.to_string().contains("line 3"),
        "{err}"
    );

    // An empty line in the middle is not a merge either.
    write(dir.path(), "merges.txt", "#version: 0.2\n\na b</w>\n");
    assert!(matches!(
        load_err(dir.path()),
        TokenizerError::BadMerge { line: 2, .. }
    ));
}

#[test]
fn merge_outside_the_vocabulary_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(dir.path(), "merges.txt", "#version: 0.2\nb a\n");
    let err = load_err(dir.path());
    let text = err.to_string();
    assert!(
        text.contains("merges.txt") && text.contains("line 2") && text.contains("\"ba\""),
        "{text}"
    );
}

#[test]
fn malformed_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"model_max_length\": 77,",
    );
    let err = load_err(dir.path());
    assert!(
        matches!(&err, TokenizerError::Json { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(dir.path(), "vocab.json", r#"{"a": "zero"}"#);
    let err = load_err(dir.path());
    assert!(
        err.to_string().contains("vocab.json") && err.to_string().contains("\"a\""),
        "{err}"
    );
}

#[test]
fn unknown_special_token_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"model_max_length": 77, "pad_token": "<pad>"}"#,
    );
    let err = load_err(dir.path());
    match &err {
        TokenizerError::UnknownSpecialToken { path, name, token } => {
            assert!(path.ends_with("tokenizer_config.json"));
            assert_eq!((name.as_str(), token.as_str()), ("pad_token", "<pad>"));
        }
        other => panic!("expected UnknownSpecialToken, got {other:?}"),
    }

    // special_tokens_map.json overrides the config (legacy layout), so it is the file named.
    write(
        dir.path(),
        "tokenizer_config.json",
        r#"{"model_max_length": 77}"#,
    );
    write(
        dir.path(),
        "special_tokens_map.json",
        r#"{"bos_token": {"content": "<s>", "normalized": true}}"#,
    );
    let err = load_err(dir.path());
    assert!(
        matches!(&err, TokenizerError::UnknownSpecialToken { path, name, .. }
            if path.ends_with("special_tokens_map.json") && name == "bos_token"),
        "{err:?}"
    );
}

#[test]
fn bad_settings_are_rejected() {
    let cases = [
        (r#"{"padding_side": "middle"}"#, "padding_side"),
        (r#"{"model_max_length": 1}"#, "model_max_length"),
        (r#"{"model_max_length": "77"}"#, "model_max_length"),
        (r#"{"pad_token": null}"#, "pad_token"),
        (r#"{"eos_token": 5}"#, "eos_token"),
        (
            r#"{"added_tokens_decoder": {"x": {"content": "a"}}}"#,
            "added_tokens_decoder",
        ),
    ];
    for (config, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        synthetic(dir.path());
        write(dir.path(), "tokenizer_config.json", config);
        let text = load_err(dir.path()).to_string();
        assert!(
            text.contains("tokenizer_config.json") && text.contains(field),
            "{config}: {text}"
        );
    }
}

#[test]
fn tokenizer_json_must_hold_a_bpe_model() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    write(
        dir.path(),
        "tokenizer.json",
        r#"{"model": {"type": "WordPiece", "vocab": {}}}"#,
    );
    let text = load_err(dir.path()).to_string();
    assert!(
        text.contains("tokenizer.json") && text.contains("WordPiece"),
        "{text}"
    );

    write(
        dir.path(),
        "tokenizer.json",
        r#"{"model": {"type": "BPE", "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1}, "merges": ["a b c"]}}"#,
    );
    let text = load_err(dir.path()).to_string();
    assert!(
        text.contains("tokenizer.json") && text.contains("merges[0]"),
        "{text}"
    );
}

#[test]
fn tokenizer_json_takes_precedence_over_vocab_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    // Same vocabulary without the "a b" merge: "abab" no longer merges its first pair.
    let vocab = read_json(&dir.path().join("vocab.json"));
    let json = json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b</w>"]]},
        "added_tokens": [],
    });
    write(dir.path(), "tokenizer.json", &json.to_string());
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("abab"), [0, 2, 3, 4, 1]);
}

#[test]
fn shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ClipTokenizer>();

    let tok = ClipTokenizer::from_dir(&bpe_dir()).unwrap();
    let prompts: Vec<String> = (0..200)
        .map(|i| format!("prompt {i} with words w{} and café {}", i % 7, i * 31))
        .collect();
    let expected: Vec<Vec<u32>> = {
        let fresh = ClipTokenizer::from_dir(&bpe_dir()).unwrap();
        prompts.iter().map(|p| fresh.encode_padded(p)).collect()
    };
    std::thread::scope(|s| {
        for t in 0..4 {
            let (tok, prompts, expected) = (&tok, &prompts, &expected);
            s.spawn(move || {
                for (i, p) in prompts.iter().enumerate().skip(t) {
                    assert_eq!(&tok.encode_padded(p), &expected[i]);
                }
            });
        }
    });
}

#[test]
fn warm_77_token_prompt_is_well_under_a_millisecond() {
    let tok = ClipTokenizer::from_dir(&bpe_dir()).unwrap();
    let prompt = "a highly detailed photograph of a majestic red fox standing in a snowy forest at \
                  dawn, soft golden light filtering through tall pine trees, mist rising from the \
                  ground, cinematic composition, shallow depth of field, 85mm lens, ultra realistic, \
                  8k resolution, award winning wildlife photography, trending on artstation, \
                  volumetric lighting, intricate fur texture, sharp focus, masterpiece, dramatic sky";
    assert!(
        tok.encode(prompt).len() >= 77,
        "the prompt should fill the context"
    );
    tok.encode_padded(prompt);
    let mut times: Vec<f64> = (0..101)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(tok.encode_padded(std::hint::black_box(prompt)));
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[50];
    eprintln!("warm encode_padded: median {:.1} µs", median * 1e6);
    assert!(median < 1e-3, "median {:.1} µs", median * 1e6);
}
