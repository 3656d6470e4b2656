//! Reading `scheduler_config.json` values the way diffusers' `from_config` hands them to a class.

use serde_json::{Map, Value};

use super::SchedulerError;

/// Parses JSON as Python's `json` module writes it: diffusers saves `-inf` defaults (for example
/// `lambda_min_clipped`) as the bare token `-Infinity`, which strict JSON rejects. Such tokens
/// outside strings become the strings `"-Infinity"`, `"Infinity"` and `"NaN"`, which the number
/// readers below accept.
pub fn parse_python_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(&quote_non_finite(text))
}

fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The config values one scheduler class sees, with typed readers that fall back to the class's
/// defaults and name the key on a bad value.
pub(super) struct Params<'a> {
    pub origin: &'a str,
    pub class: &'static str,
    /// Values that win over everything (what the scheduler kind itself fixes).
    pub overrides: &'a [(&'static str, Value)],
    /// Pipeline fix-ups, present only when building the folder's own class.
    pub own: Option<&'a Map<String, Value>>,
    pub values: &'a Map<String, Value>,
}

impl Params<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        if let Some((_, v)) = self.overrides.iter().find(|(k, _)| *k == key) {
            return Some(v);
        }
        if let Some(v) = self.own.and_then(|own| own.get(key)) {
            return Some(v);
        }
        self.values.get(key)
    }

    pub fn err(&self, key: &str, reason: impl Into<String>) -> SchedulerError {
        SchedulerError::InvalidKey {
            origin: self.origin.to_string(),
            class: self.class,
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(&self, key: &str, reason: impl Into<String>) -> SchedulerError {
        let value = self.get(key).map(|v| v.to_string()).unwrap_or_default();
        SchedulerError::Unsupported {
            origin: self.origin.to_string(),
            class: self.class,
            key: key.to_string(),
            value,
            reason: reason.into(),
        }
    }

    fn number(&self, key: &str, v: &Value) -> Result<f64, SchedulerError> {
        match v {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| self.err(key, format!("{n} is not a number"))),
            Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
            Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
            Value::String(s) if s == "NaN" => Ok(f64::NAN),
            other => Err(self.err(key, format!("expected a number, got {other}"))),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => self.number(key, v),
        }
    }

    /// `None` when absent or `null`.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.number(key, v).map(Some),
        }
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(i);
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                    _ => Err(self.err(key, format!("expected an integer, got {n}"))),
                }
            }
            Some(other) => Err(self.err(key, format!("expected an integer, got {other}"))),
        }
    }

    /// `num_train_timesteps`, which every class reads (default 1000).
    pub fn num_train_timesteps(&self) -> Result<usize, SchedulerError> {
        let t = self.int("num_train_timesteps", 1000)?;
        if !(2..=100_000).contains(&t) {
            return Err(self.err(
                "num_train_timesteps",
                format!("{t} is not between 2 and 100000"),
            ));
        }
        Ok(t as usize)
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, SchedulerError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(key, format!("expected true or false, got {other}"))),
        }
    }

    /// `None` (the Python default) counts as false.
    pub fn opt_bool(&self, key: &str, default: bool) -> Result<bool, SchedulerError> {
        match self.get(key) {
            Some(Value::Null) => Ok(false),
            _ => self.bool(key, default),
        }
    }

    /// A string that must be one of `allowed`.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str, SchedulerError> {
        let s = match self.get(key) {
            None => return Ok(default),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(self.err(key, format!("expected a string, got {other}"))),
        };
        allowed.iter().copied().find(|a| *a == s).ok_or_else(|| {
            let list = allowed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ");
            self.err(key, format!("`{s}` is not one of {list}"))
        })
    }

    /// The raw string, for keys whose values are checked by the caller.
    pub fn string(&self, key: &str, default: &'static str) -> Result<String, SchedulerError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(key, format!("expected a string, got {other}"))),
        }
    }

    /// `None` when absent or `null`.
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| self.number(key, v))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(self.err(key, format!("expected a list of numbers, got {other}"))),
        }
    }

    pub fn int_list(&self, key: &str) -> Result<Vec<i64>, SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Number(n) if n.as_i64().is_some() => Ok(n.as_i64().unwrap_or_default()),
                    other => {
                        Err(self.err(key, format!("expected a list of integers, found {other}")))
                    }
                })
                .collect(),
            Some(other) => Err(self.err(key, format!("expected a list of integers, got {other}"))),
        }
    }

    /// Rejects a truthy value of a feature that is not implemented.
    pub fn reject_true(&self, key: &str, reason: &str) -> Result<(), SchedulerError> {
        if self.opt_bool(key, false)? {
            Err(self.unsupported(key, reason))
        } else {
            Ok(())
        }
    }

    /// Rejects any non-null value of a key that is not implemented.
    pub fn reject_non_null(&self, key: &str, reason: &str) -> Result<(), SchedulerError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(_) => Err(self.unsupported(key, reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_tokens_parse_outside_strings_only() {
        let v = parse_python_json(
            r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "-Infinity x \"NaN\""}"#,
        )
        .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "Infinity");
        assert_eq!(v["b"][1], "NaN");
        assert_eq!(v["c"], "-Infinity x \"NaN\"");
    }
}
