//! `memory_budget`: how much memory the loaded weights and running generations of a device may
//! take together ("auto", "off", or a size).

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::value::{Setting, describe};

/// The `memory_budget` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBudgetSetting {
    /// What the process may use (cgroup limit, physical memory, address-space limit).
    #[default]
    Auto,
    /// No budget.
    Off,
    /// This many bytes per device.
    Bytes(u64),
}

const UNITS: [(&str, u64); 8] = [
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

const EXPECTED: &str =
    "expected \"auto\", \"off\" or a size such as 12884901888, \"12GiB\", \"512MiB\" or \"20GB\"";

impl FromStr for MemoryBudgetSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "auto" => return Ok(Self::Auto),
            "off" => return Ok(Self::Off),
            _ => {}
        }
        let (number, scale) = UNITS
            .iter()
            .find_map(|&(unit, scale)| {
                let cut = t.len().checked_sub(unit.len())?;
                let suffix = t.get(cut..)?;
                suffix
                    .eq_ignore_ascii_case(unit)
                    .then(|| (t[..cut].trim(), scale))
            })
            .unwrap_or((t, 1));
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{EXPECTED}, found {s:?}"))?;
        let bytes = value * scale as f64;
        if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(format!("{EXPECTED}, found {s:?}"));
        }
        Ok(Self::Bytes(bytes as u64))
    }
}

impl fmt::Display for MemoryBudgetSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Off => f.write_str("off"),
            Self::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl serde::Serialize for MemoryBudgetSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bytes(b) => s.serialize_u64(*b),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl Setting for MemoryBudgetSetting {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse(),
            Value::Number(n) => n
                .as_u64()
                .filter(|&b| b > 0)
                .map(Self::Bytes)
                .ok_or_else(|| format!("{EXPECTED}, {}", describe(v))),
            _ => Err(format!("{EXPECTED}, {}", describe(v))),
        }
    }

    fn from_text(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keywords_and_mistakes() {
        let b = MemoryBudgetSetting::Bytes;
        assert_eq!("auto".parse(), Ok(MemoryBudgetSetting::Auto));
        assert_eq!(" OFF ".parse(), Ok(MemoryBudgetSetting::Off));
        assert_eq!("12GiB".parse(), Ok(b(12 << 30)));
        assert_eq!("1.5 GiB".parse(), Ok(b(3 << 29)));
        assert_eq!("512mib".parse(), Ok(b(512 << 20)));
        assert_eq!("20GB".parse(), Ok(b(20_000_000_000)));
        assert_eq!("4096".parse(), Ok(b(4096)));
        for bad in ["", "-1GiB", "0", "lots", "12 GiBs", "nan", "1e30TiB"] {
            let err = bad.parse::<MemoryBudgetSetting>().unwrap_err();
            assert!(err.contains("expected \"auto\""), "{bad}: {err}");
        }
        assert_eq!(
            MemoryBudgetSetting::from_json(&serde_json::json!(1024)),
            Ok(b(1024))
        );
        assert!(MemoryBudgetSetting::from_json(&serde_json::json!(true)).is_err());
        assert!(MemoryBudgetSetting::from_json(&serde_json::json!(0)).is_err());
    }
}
