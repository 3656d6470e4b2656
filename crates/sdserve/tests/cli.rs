//! The command line of the built binary: help and `settings` document every setting, and bad
//! invocations fail with a message. (This integration test also makes `cargo test` build the
//! `sdserve` binary that the end-to-end suite in `tests/` starts.)

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sdserve_settings::SERVER_SETTINGS;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args`, killing it if it takes more than 30 s.
fn sdserve(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sdserve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("polling sdserve").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("sdserve {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("collecting output");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A folder that does not exist.
fn missing_folder() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "sdserve-cli-missing-{}-{nanos}",
        std::process::id()
    ))
}

#[test]
fn help_names_the_commands_and_the_version() {
    let r = sdserve(&["--help"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for needle in ["start", "settings"] {
        assert!(
            r.stdout.contains(needle),
            "--help does not mention {needle}:\n{}",
            r.stdout
        );
    }
    let r = sdserve(&["--version"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", r.stdout);
}

#[test]
fn start_help_documents_every_flag() {
    let r = sdserve(&["start", "--help"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let with_flags: Vec<_> = SERVER_SETTINGS
        .iter()
        .filter(|d| d.flag.is_some())
        .collect();
    assert!(with_flags.len() >= 13, "the settings table lost its flags");
    for doc in with_flags {
        let flag = doc.flag.expect("filtered");
        // The flag's help paragraph follows its line and runs to the next blank line.
        let start = r
            .stdout
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} is not documented:\n{}", r.stdout));
        let paragraph = r.stdout[start..].split("\n\n").next().unwrap_or_default();
        for needle in [doc.env, doc.key, doc.default] {
            assert!(
                paragraph.contains(needle),
                "help of {flag} does not mention {needle:?}: {paragraph}"
            );
        }
    }
}

#[test]
fn settings_prints_every_key_variable_and_flag() {
    let r = sdserve(&["settings"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for doc in SERVER_SETTINGS {
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(&format!("`{}`", doc.key)))
            .unwrap_or_else(|| panic!("no line for {}:\n{}", doc.key, r.stdout));
        assert!(line.contains(doc.env), "{line}");
        if let Some(flag) = doc.flag {
            assert!(line.contains(flag), "{line}");
        }
    }
}

#[test]
fn bad_invocations_fail_with_a_message() {
    let tmp = std::env::temp_dir();
    let folder = tmp.to_str().expect("UTF-8 temp dir");
    for (args, needles) in [
        (
            vec!["start", folder, "--http-port", "notaport"],
            vec!["--http-port", "notaport"],
        ),
        (
            vec!["start", folder, "--max-queue-size=-1"],
            vec!["--max-queue-size", "-1"],
        ),
        (
            vec!["start", folder, "--debug", "maybe"],
            vec!["--debug", "maybe"],
        ),
        (
            vec!["start", folder, "--no-such-flag", "1"],
            vec!["--no-such-flag"],
        ),
        (vec!["start"], vec!["FOLDER"]),
        (vec!["frobnicate"], vec!["frobnicate"]),
    ] {
        let r = sdserve(&args);
        assert!(
            r.code.is_some_and(|c| c != 0),
            "sdserve {args:?} exited with {:?}",
            r.code
        );
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "sdserve {args:?}: stderr does not mention {n:?}:\n{}",
                r.stderr
            );
        }
    }

    let missing = missing_folder();
    let r = sdserve(&[
        "start",
        missing.to_str().expect("UTF-8 path"),
        "--http-port",
        "0",
        "--metrics-port",
        "0",
    ]);
    assert!(
        r.code.is_some_and(|c| c != 0),
        "start on a missing folder exited with {:?}",
        r.code
    );
    assert!(
        r.stderr.contains(&missing.display().to_string()),
        "{}",
        r.stderr
    );
}
