//! A small Prometheus registry and text renderer.
//!
//! Written in-house rather than taken from a metrics crate because the output must match
//! MLServer's scrape byte for byte where dashboards care: family names, label names,
//! `le` values printed as Python prints floats (`1.0`, `10.0`), summaries with only
//! `_count`/`_sum`, and no extra labels.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// The buckets of every histogram the monitoring document defines (`docs/metrics.md`).
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets for our own series, fit for generations that take seconds to minutes.
pub const LONG_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
    600.0, 1200.0,
];

/// Formats a sample value the way Python's `repr(float)` does for the values we emit.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

#[derive(Debug, Clone)]
struct Series {
    /// Counter/gauge value, or histogram/summary sum.
    value: f64,
    count: u64,
    buckets: Vec<u64>,
}

#[derive(Debug)]
struct FamilyState {
    series: BTreeMap<Vec<String>, Series>,
}

/// One metric family: a name, a type, label names, and its series.
#[derive(Debug)]
pub struct Family {
    name: String,
    help: String,
    kind: Kind,
    labels: Vec<&'static str>,
    buckets: Vec<f64>,
    state: Mutex<FamilyState>,
}

impl Family {
    fn new(name: &str, help: &str, kind: Kind, labels: &[&'static str], buckets: &[f64]) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind,
            labels: labels.to_vec(),
            buckets: buckets.to_vec(),
            state: Mutex::new(FamilyState {
                series: BTreeMap::new(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn with_series(&self, values: &[&str], f: impl FnOnce(&mut Series)) {
        debug_assert_eq!(
            values.len(),
            self.labels.len(),
            "label count of {}",
            self.name
        );
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.buckets.len();
        let series = state.series.entry(key).or_insert_with(|| Series {
            value: 0.0,
            count: 0,
            buckets: vec![0; n],
        });
        f(series);
    }

    /// Creates the series at zero if absent (so dashboards see it before the first event).
    pub fn touch(&self, values: &[&str]) {
        self.with_series(values, |_| {});
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    pub fn add(&self, values: &[&str], v: f64) {
        self.with_series(values, |s| s.value += v);
    }

    pub fn set(&self, values: &[&str], v: f64) {
        self.with_series(values, |s| s.value = v);
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        let bounds = &self.buckets;
        self.with_series(values, |s| {
            s.value += v;
            s.count += 1;
            for (i, b) in bounds.iter().enumerate() {
                if v <= *b {
                    s.buckets[i] += 1;
                }
            }
        });
    }

    /// Current value of a counter/gauge series (sum for histograms), if it exists.
    pub fn get(&self, values: &[&str]) -> Option<f64> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.series.get(&key).map(|s| s.value)
    }

    fn label_text(&self, values: &[String], le: Option<&str>) -> String {
        let mut pairs: Vec<(&str, String)> = self
            .labels
            .iter()
            .copied()
            .zip(values.iter().map(|v| escape_label(v)))
            .collect();
        if let Some(le) = le {
            pairs.push(("le", le.to_owned()));
        }
        // Sorted by label name, as prometheus_client prints them.
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        if pairs.is_empty() {
            return String::new();
        }
        let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{{{}}}", inner.join(","))
    }

    fn render(&self, out: &mut String) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(&self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.as_str());
        for (values, s) in &state.series {
            match self.kind {
                Kind::Counter | Kind::Gauge => {
                    let _ = writeln!(
                        out,
                        "{}{} {}",
                        self.name,
                        self.label_text(values, None),
                        format_value(s.value)
                    );
                }
                Kind::Summary => {
                    let labels = self.label_text(values, None);
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        self.name,
                        labels,
                        format_value(s.count as f64)
                    );
                    let _ = writeln!(out, "{}_sum{} {}", self.name, labels, format_value(s.value));
                }
                Kind::Histogram => {
                    for (b, c) in self.buckets.iter().zip(&s.buckets) {
                        let le = format_value(*b);
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {}",
                            self.name,
                            self.label_text(values, Some(&le)),
                            format_value(*c as f64)
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        self.name,
                        self.label_text(values, Some("+Inf")),
                        format_value(s.count as f64)
                    );
                    let labels = self.label_text(values, None);
                    let _ = writeln!(out, "{}_sum{} {}", self.name, labels, format_value(s.value));
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        self.name,
                        labels,
                        format_value(s.count as f64)
                    );
                }
            }
        }
    }
}

/// All families of one process, rendered in registration order.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<Family>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, family: Family) -> Arc<Family> {
        let family = Arc::new(family);
        self.families
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(family.clone());
        family
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[&'static str]) -> Arc<Family> {
        self.register(Family::new(name, help, Kind::Counter, labels, &[]))
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&'static str]) -> Arc<Family> {
        self.register(Family::new(name, help, Kind::Gauge, labels, &[]))
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&'static str],
        buckets: &[f64],
    ) -> Arc<Family> {
        self.register(Family::new(name, help, Kind::Histogram, labels, buckets))
    }

    pub fn summary(&self, name: &str, help: &str, labels: &[&'static str]) -> Arc<Family> {
        self.register(Family::new(name, help, Kind::Summary, labels, &[]))
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let families = self
            .families
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = String::new();
        for f in families {
            f.render(&mut out);
        }
        out
    }
}

/// Content type of [`Registry::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_like_python_floats() {
        assert_eq!(format_value(6.0), "6.0");
        assert_eq!(format_value(0.005), "0.005");
        assert_eq!(format_value(2847.5), "2847.5");
        assert_eq!(format_value(10.0), "10.0");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
    }

    #[test]
    fn renders_the_document_shapes() {
        let r = Registry::new();
        let c = r.counter(
            "model_infer_request_success_total",
            "Model infer request success count",
            &["model", "version"],
        );
        let s = r.summary(
            "model_infer_request_duration",
            "Model infer request duration",
            &["model", "version"],
        );
        let h = r.histogram("parallel_request_queue", "queue wait", &[], DEFAULT_BUCKETS);
        c.inc(&["m", "None"]);
        c.inc(&["m", "None"]);
        s.observe(&["m", "None"], 1.5);
        h.observe(&[], 0.3);
        h.observe(&[], 12.0);
        let text = r.render();
        assert!(
            text.contains("model_infer_request_success_total{model=\"m\",version=\"None\"} 2.0\n")
        );
        assert!(text.contains("# TYPE model_infer_request_duration summary\n"));
        assert!(
            text.contains("model_infer_request_duration_count{model=\"m\",version=\"None\"} 1.0\n")
        );
        assert!(
            text.contains("model_infer_request_duration_sum{model=\"m\",version=\"None\"} 1.5\n")
        );
        assert!(text.contains("parallel_request_queue_bucket{le=\"0.25\"} 0.0\n"));
        assert!(text.contains("parallel_request_queue_bucket{le=\"0.5\"} 1.0\n"));
        assert!(text.contains("parallel_request_queue_bucket{le=\"10.0\"} 1.0\n"));
        assert!(text.contains("parallel_request_queue_bucket{le=\"+Inf\"} 2.0\n"));
        assert!(text.contains("parallel_request_queue_sum 12.3\n"));
        assert!(text.contains("parallel_request_queue_count 2.0\n"));
    }

    #[test]
    fn labels_are_sorted_and_escaped() {
        let r = Registry::new();
        let h = r.histogram("x_seconds", "h", &["path", "method"], &[1.0]);
        h.observe(&["/a\"b", "GET"], 0.5);
        let text = r.render();
        assert!(
            text.contains("x_seconds_bucket{le=\"1.0\",method=\"GET\",path=\"/a\\\"b\"} 1.0"),
            "{text}"
        );
    }
}
