//! Typed values from the three sources of a setting (a JSON file, an environment variable, a
//! command-line flag), coerced the way pydantic's lax mode does for MLServer: numbers may come as
//! numeric strings, booleans as `true/false/1/0/yes/no/on/off`, lists and objects from the
//! environment as JSON.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::env::Env;
use crate::error::{Origin, SettingsError};

/// A type a setting can have.
pub(crate) trait Setting: Sized {
    fn from_json(v: &Value) -> Result<Self, String>;
    /// From an environment variable or a flag.
    fn from_text(s: &str) -> Result<Self, String>;
}

/// Short description of a JSON value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    let mut text = v.to_string();
    if text.chars().count() > 60 {
        text = text.chars().take(57).collect::<String>() + "...";
    }
    let kind = match v {
        Value::Null => return "found null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    format!("found {kind} ({text})")
}

pub(crate) fn parse_bool_text(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

impl Setting for bool {
    fn from_json(v: &Value) -> Result<Self, String> {
        let parsed = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_f64() == Some(0.0) => Some(false),
            Value::Number(n) if n.as_f64() == Some(1.0) => Some(true),
            Value::String(s) => parse_bool_text(s),
            _ => None,
        };
        parsed.ok_or_else(|| format!("expected a boolean, {}", describe(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        parse_bool_text(s)
            .ok_or_else(|| "expected a boolean (true/false, 1/0, yes/no, on/off)".into())
    }
}

fn integer_from_json(v: &Value) -> Result<i128, String> {
    let err = || format!("expected an integer, {}", describe(v));
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i as i128)
            } else if let Some(u) = n.as_u64() {
                Ok(u as i128)
            } else {
                match n.as_f64() {
                    Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(x as i128),
                    _ => Err(err()),
                }
            }
        }
        Value::String(s) => integer_from_text(s).map_err(|_| err()),
        _ => Err(err()),
    }
}

fn integer_from_text(s: &str) -> Result<i128, String> {
    s.trim()
        .parse::<i128>()
        .map_err(|_| "expected an integer".to_string())
}

macro_rules! integer_setting {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            fn from_json(v: &Value) -> Result<Self, String> {
                integer_from_json(v).and_then(narrow::<$t>)
            }
            fn from_text(s: &str) -> Result<Self, String> {
                integer_from_text(s).and_then(narrow::<$t>)
            }
        }
    )*};
}

fn narrow<T: TryFrom<i128> + Bounded>(i: i128) -> Result<T, String> {
    T::try_from(i).map_err(|_| format!("{i} is out of range ({}..={})", T::MIN_TEXT, T::MAX_TEXT))
}

pub(crate) trait Bounded {
    const MIN_TEXT: &'static str;
    const MAX_TEXT: &'static str;
}
impl Bounded for u16 {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "65535";
}
impl Bounded for u64 {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "18446744073709551615";
}
impl Bounded for usize {
    const MIN_TEXT: &'static str = "0";
    const MAX_TEXT: &'static str = "18446744073709551615";
}
impl Bounded for i64 {
    const MIN_TEXT: &'static str = "-9223372036854775808";
    const MAX_TEXT: &'static str = "9223372036854775807";
}

integer_setting!(u16, u64, usize, i64);

impl Setting for f64 {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .ok_or_else(|| format!("expected a number, {}", describe(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<f64>()
            .map_err(|_| "expected a number".to_string())
    }
}

impl Setting for String {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(format!("expected a string, {}", describe(v))),
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
}

fn json_from_text(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("expected JSON: {e}"))
}

impl Setting for Vec<String> {
    fn from_json(v: &Value) -> Result<Self, String> {
        let Value::Array(items) = v else {
            return Err(format!("expected a list of strings, {}", describe(v)));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("item {i}: expected a string, {}", describe(other))),
            })
            .collect()
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Self::from_json(&json_from_text(s)?)
    }
}

impl Setting for Vec<Value> {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::Array(items) => Ok(items.clone()),
            _ => Err(format!("expected a list, {}", describe(v))),
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Self::from_json(&json_from_text(s)?)
    }
}

impl Setting for Map<String, Value> {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::Object(m) => Ok(m.clone()),
            _ => Err(format!("expected an object, {}", describe(v))),
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Self::from_json(&json_from_text(s)?)
    }
}

/// Any JSON; from text, JSON if it parses, else the text as a string (a path, for
/// `logging_settings`).
impl Setting for Value {
    fn from_json(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Ok(serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string())))
    }
}

impl<T: Setting> Setting for Option<T> {
    fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_json(v).map(Some),
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        T::from_text(s).map(Some)
    }
}

/// The layered sources of one settings object: keys of a JSON object from a file, then
/// `<env_prefix><KEY>` variables. A key present in the file wins even when its value is null.
pub(crate) struct Sources<'a> {
    pub obj: Option<&'a Map<String, Value>>,
    pub origin: &'a Origin,
    /// Prepended to keys in error messages (`"parameters."`).
    pub key_prefix: &'a str,
    pub env: &'a Env,
    pub env_prefix: &'a str,
}

impl Sources<'_> {
    pub fn env_var(&self, key: &str) -> String {
        format!("{}{}", self.env_prefix, key.to_ascii_uppercase())
    }

    /// The value for `key`, or `None` when neither source sets it.
    pub fn get<T: Setting>(&self, key: &str) -> Result<Option<T>, SettingsError> {
        self.get_checked(key, |_| Ok(()))
    }

    /// Like [`Sources::get`], with a range or format check whose message names the source.
    pub fn get_checked<T: Setting>(
        &self,
        key: &str,
        check: impl Fn(&T) -> Result<(), String>,
    ) -> Result<Option<T>, SettingsError> {
        if let Some(v) = self.obj.and_then(|o| o.get(key)) {
            return T::from_json(v)
                .and_then(|t| check(&t).map(|()| t))
                .map(Some)
                .map_err(|message| SettingsError::InvalidValue {
                    origin: self.origin.clone(),
                    key: format!("{}{key}", self.key_prefix),
                    message,
                });
        }
        let var = self.env_var(key);
        match self.env.get(&var) {
            Some(text) => T::from_text(text)
                .and_then(|t| check(&t).map(|()| t))
                .map(Some)
                .map_err(|message| SettingsError::InvalidEnv {
                    var,
                    value: text.to_string(),
                    message,
                }),
            None => Ok(None),
        }
    }
}

/// Warnings for keys of `obj` that are not in `known`, with a suggestion for near misses.
pub(crate) fn unknown_key_warnings(
    obj: &Map<String, Value>,
    known: &[&str],
    origin: &Origin,
    key_prefix: &str,
    warnings: &mut Vec<String>,
) {
    for key in obj.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let hint = known
            .iter()
            .map(|k| (edit_distance(k, key), k))
            .filter(|(d, _)| *d <= 2)
            .min()
            .map(|(_, k)| format!("; did you mean `{key_prefix}{k}`?"))
            .unwrap_or_default();
        warnings.push(format!(
            "{origin}: unknown key `{key_prefix}{key}` is ignored{hint}"
        ));
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads a JSON file that must hold an object. Syntax errors name the line and column.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>, SettingsError> {
    let bytes = std::fs::read(path).map_err(|source| SettingsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        SettingsError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: full.strip_suffix(&suffix).unwrap_or(&full).to_string(),
        }
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(SettingsError::InvalidValue {
            origin: Origin::File(path.to_path_buf()),
            key: "(top level)".into(),
            message: format!("expected a JSON object, {}", describe(&other)),
        }),
    }
}

/// `base.join(path)` with `.` and `..` removed without touching the file system, like Python's
/// `os.path.abspath`.
pub(crate) fn absolute(base: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let mut out = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                // Never above the root, as abspath.
                if out.parent().is_some() {
                    out.pop();
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lax_coercion_like_pydantic() {
        assert_eq!(u16::from_json(&json!(8080)).unwrap(), 8080);
        assert_eq!(u16::from_json(&json!("8080")).unwrap(), 8080);
        assert_eq!(u16::from_json(&json!(8080.0)).unwrap(), 8080);
        assert!(u16::from_json(&json!(8080.5)).is_err());
        assert!(
            u16::from_json(&json!(70000))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(u16::from_json(&json!(true)).is_err());
        assert!(bool::from_json(&json!("Yes")).unwrap());
        assert!(!bool::from_json(&json!(0)).unwrap());
        assert!(bool::from_json(&json!("maybe")).is_err());
        assert!(bool::from_text("ON").unwrap());
        assert!(!bool::from_text("False").unwrap());
        assert!(
            String::from_json(&json!(1))
                .unwrap_err()
                .contains("found a number (1)")
        );
        assert_eq!(
            Vec::<String>::from_text(r#"["a","b"]"#).unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(Vec::<String>::from_text("a,b").is_err());
        assert_eq!(Option::<u64>::from_json(&Value::Null).unwrap(), None);
        assert_eq!(f64::from_json(&json!("2.5")).unwrap(), 2.5);
    }

    #[test]
    fn absolute_is_lexical() {
        assert_eq!(
            absolute(Path::new("/a/b"), Path::new("../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(
            absolute(Path::new("/a"), Path::new("/x/../y")),
            PathBuf::from("/y")
        );
        assert_eq!(
            absolute(Path::new("/"), Path::new("../..")),
            PathBuf::from("/")
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("http_port", "http_prot"), 2);
        assert_eq!(edit_distance("debug", "debug"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
