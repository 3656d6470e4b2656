//! The deployment files under `deploy/prometheus` checked by Prometheus' own `promtool`: the
//! alert rules, their unit tests (each alert fires on some synthetic series and stays quiet on
//! others), and the example configuration.

use std::process::Command;
use std::time::Duration;

use sdserve_tests::*;

/// Runs `promtool <args>` in `deploy/prometheus`; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let dir = workspace_root().join("deploy").join("prometheus");
    let exit = run_command(
        Command::new(prometheus_tool("promtool"))
            .args(args)
            .current_dir(&dir),
        Duration::from_secs(120),
    );
    let output = format!("{}{}", exit.stdout, exit.stderr);
    assert!(
        exit.status.success(),
        "promtool {} failed ({}):\n{output}",
        args.join(" "),
        exit.status
    );
    output
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
}

#[test]
fn alert_rule_unit_tests_pass() {
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Each alert of alerts.yml has a unit test where it fires and one where it does not.
#[test]
fn every_alert_has_firing_and_quiet_cases() {
    let dir = workspace_root().join("deploy").join("prometheus");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("reading alerts.yml");
    let tests =
        std::fs::read_to_string(dir.join("alerts_test.yml")).expect("reading alerts_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    // Cases are `alertname: X` followed by `exp_alerts: []` (quiet) or by a list (fires).
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in alerts {
        let (mut fires, mut quiet) = (0, 0);
        for (i, line) in lines.iter().enumerate() {
            if *line != format!("alertname: {alert}") {
                continue;
            }
            match lines.get(i + 1).copied() {
                Some("exp_alerts: []") => quiet += 1,
                Some("exp_alerts:") => fires += 1,
                other => panic!("alertname: {alert} is followed by {other:?}"),
            }
        }
        assert!(
            fires >= 1 && quiet >= 1,
            "{alert}: {fires} firing and {quiet} quiet cases in alerts_test.yml"
        );
    }
}

#[test]
fn example_prometheus_config_is_valid() {
    let out = promtool(&["check", "config", "prometheus.yml"]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
}
