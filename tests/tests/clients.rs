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
