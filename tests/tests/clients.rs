//! Independent clients against the real server: `tests/python` runs NVIDIA's `tritonclient`
//! (HTTP and gRPC), MLServer 1.7.1's own codecs, types and batch client, and the official
//! `openai` package (the Images API) with pytest, in the
//! Python environment at `target/py-venv` (created from `tests/python/requirements.txt` if needed).
//!
//! `tests/python/grpc` runs in a pytest process of its own: MLServer's and tritonclient's
//! generated protobuf modules both define the `inference` package, and protobuf refuses the
//! second in one process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use sdserve_tests::*;

/// Runs pytest on `args` against `s`; checks that at least `min_passed` tests passed and none
/// was skipped, failed or errored.
fn pytest(python: &Path, s: &Server, args: &[&str], min_passed: usize) {
    let exit = run_command(
        Command::new(python)
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
            .args(args)
            .current_dir(workspace_root())
            .env("SDSERVE_URL", s.url(""))
            .env("SDSERVE_GRPC", format!("127.0.0.1:{}", s.grpc_port()))
            .env(
                "SDSERVE_METRICS",
                format!("http://127.0.0.1:{}", s.metrics_port()),
            )
            .env("SDSERVE_MODEL", "tiny")
            .env("SDSERVE_SDXL_MODEL", "xl")
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Duration::from_secs(600),
    );
    let output = format!("{}{}", exit.stdout, exit.stderr);
    println!("{output}");
    assert!(
        exit.status.success(),
        "pytest {args:?} failed ({}):\n{output}",
        exit.status
    );
    // A run that collected nothing or skipped tests must not pass unnoticed.
    let summary = output
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .unwrap_or_else(|| panic!("no pytest summary line:\n{output}"));
    let passed: usize = summary
        .split_whitespace()
        .zip(summary.split_whitespace().skip(1))
        .find(|(_, word)| word.trim_end_matches(',') == "passed")
        .and_then(|(n, _)| n.trim_start_matches('=').parse().ok())
        .unwrap_or_else(|| panic!("no passed count in {summary:?}"));
    assert!(
        passed >= min_passed,
        "only {passed} client tests passed: {summary}"
    );
    for word in ["skipped", "failed", "error", "xfail"] {
        assert!(!summary.contains(word), "{summary}");
    }
}

#[test]
fn tritonclient_and_mlserver_codecs_talk_to_sdserve() {
    let python = python_venv();
    let repo = Repo::new();
    repo.tiny("tiny");
    let mut xl = tiny_settings("xl", None);
    xl["parameters"]["uri"] = json!(workspace_root().join("models/tiny-sdxl"));
    repo.model("xl", xl);
    let s = launch(&repo).start();
    pytest(
        &python,
        &s,
        &["tests/python", "--ignore=tests/python/grpc"],
        21,
    );
    pytest(&python, &s, &["tests/python/grpc"], 10);
}

/// The Python block of the README's "OpenAI clients" section.
fn readme_openai_example() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("\n## OpenAI clients\n")
        .nth(1)
        .expect("the README has an OpenAI clients section");
    let block = section
        .split("```python\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a Python block in the OpenAI clients section");
    block.to_owned()
}

#[test]
fn the_readmes_openai_example_runs() {
    let python = python_venv();
    let example = readme_openai_example();
    assert!(example.contains("http://localhost:8080/v1"), "{example}");
    let s = launch_folder(&workspace_root().join("models/tiny-shapes")).start();
    let script = example.replace("http://localhost:8080", &s.url(""));
    let dir = tempfile::tempdir().unwrap();
    let exit = run_command(
        std::process::Command::new(&python)
            .args(["-c", &script])
            .current_dir(dir.path()),
        Duration::from_secs(300),
    );
    assert!(exit.status.success(), "{}{}", exit.stdout, exit.stderr);
    assert_eq!(exit.stdout.trim(), "42 64x64", "what the example prints");
    let png = std::fs::read(dir.path().join("image.png")).expect("the example writes image.png");
    let decoder = png::Decoder::new(std::io::Cursor::new(&png));
    let info = decoder.read_info().expect("a PNG file").info().clone();
    assert_eq!((info.width, info.height), (64, 64));
    // The V2 route draws the same picture from the same prompt, seed and steps.
    let v2 = s
        .infer(
            "tiny-shapes",
            &prompt_request(
                "a red circle on a blue background",
                json!({"seed": 42, "num_inference_steps": 20, "width": 64, "height": 64}),
            ),
        )
        .json();
    let v2_png = base64::engine::general_purpose::STANDARD
        .decode(v2["outputs"][0]["data"][0].as_str().unwrap())
        .unwrap();
    assert!(
        png == v2_png,
        "the OpenAI route drew another picture than the V2 route"
    );
}
