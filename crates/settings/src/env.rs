//! The process environment as the settings see it: `MLSERVER_*` variables and the working
//! directory. Parsing code only ever reads an [`Env`], so tests can hand in their own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the dotenv file read from the working directory, as pydantic-settings does for MLServer.
pub const DOTENV_FILE: &str = ".env";

/// Environment variables (looked up case-insensitively, like pydantic-settings) and the
/// working directory that relative paths from the environment are resolved against.
#[derive(Debug, Clone)]
pub struct Env {
    vars: HashMap<String, String>,
    cwd: PathBuf,
    warnings: Vec<String>,
}

impl Env {
    /// An environment made of the given variables. Names are matched case-insensitively; when two
    /// names differ only in case, the upper-case spelling wins.
    pub fn new<I, K, V>(vars: I, cwd: impl Into<PathBuf>) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut env = Env {
            vars: HashMap::new(),
            cwd: cwd.into(),
            warnings: Vec::new(),
        };
        env.merge(vars, true);
        env
    }

    /// The real process environment, plus `MLSERVER_*` lines of `./.env` for variables the
    /// environment does not set (environment variables win, as in MLServer).
    pub fn from_process() -> Env {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        // Non-UTF-8 values are kept lossily so that parsing them fails with the variable's name.
        let vars = std::env::vars_os().filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            Some((k, v.to_string_lossy().into_owned()))
        });
        let mut env = Env::new(vars, cwd);
        let dotenv = env.cwd.join(DOTENV_FILE);
        env.add_dotenv_file(&dotenv);
        env
    }

    /// Adds the variables of a dotenv file for names not already set. A missing file is fine;
    /// an unreadable file or a malformed line becomes a warning.
    pub fn add_dotenv_file(&mut self, path: &Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.warnings
                    .push(format!("{}: not read: {e}", path.display()));
                return;
            }
        };
        let (vars, warnings) = parse_dotenv(&text);
        self.warnings.extend(
            warnings
                .into_iter()
                .map(|w| format!("{}: {w}", path.display())),
        );
        self.merge(vars, false);
    }

    fn merge<I, K, V>(&mut self, vars: I, overwrite: bool)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut exact = Vec::new();
        for (k, v) in vars {
            let k = k.as_ref();
            let upper = k.to_ascii_uppercase();
            if k == upper {
                exact.push((upper, v.into()));
            } else if overwrite || !self.vars.contains_key(&upper) {
                self.vars.insert(upper, v.into());
            }
        }
        for (k, v) in exact {
            if overwrite || !self.vars.contains_key(&k) {
                self.vars.insert(k, v);
            }
        }
    }

    /// The value of a variable, matched case-insensitively.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(&name.to_ascii_uppercase())
            .map(String::as_str)
    }

    /// The working directory.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// Problems met while reading a dotenv file.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Parses dotenv text: `KEY=VALUE` lines, optional `export `, `#` comments, single-quoted
/// (literal) and double-quoted (with `\n`, `\t`, `\\`, `\"` escapes) values. Returns the pairs and
/// one warning per line that could not be read.
fn parse_dotenv(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut vars = Vec::new();
    let mut warnings = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            // python-dotenv treats a bare name as "no value"; nothing to set.
            continue;
        };
        let key = key.trim();
        let valid_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !valid_key {
            warnings.push(format!("line {}: invalid variable name {key:?}", index + 1));
            continue;
        }
        match parse_dotenv_value(value.trim()) {
            Ok(value) => vars.push((key.to_string(), value)),
            Err(e) => warnings.push(format!("line {}: {e}", index + 1)),
        }
    }
    (vars, warnings)
}

fn parse_dotenv_value(value: &str) -> Result<String, String> {
    if let Some(rest) = value.strip_prefix('\'') {
        let end = rest.find('\'').ok_or("unterminated single-quoted value")?;
        return Ok(rest[..end].to_string());
    }
    if let Some(rest) = value.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Ok(out),
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(other) => {
                        if !matches!(other, '\\' | '"' | '\'') {
                            out.push('\\');
                        }
                        out.push(other);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        return Err("unterminated double-quoted value".into());
    }
    // Unquoted: an inline comment starts at " #".
    let value = match value.find(" #") {
        Some(i) => &value[..i],
        None => value,
    };
    Ok(value.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_case_insensitive_and_upper_case_wins() {
        let env = Env::new(
            [
                ("mlserver_http_port", "1"),
                ("MLSERVER_HTTP_PORT", "2"),
                ("mlserver_debug", "false"),
            ],
            "/",
        );
        assert_eq!(env.get("MLSERVER_HTTP_PORT"), Some("2"));
        assert_eq!(env.get("MLSERVER_DEBUG"), Some("false"));
        assert_eq!(env.get("MLSERVER_GRPC_PORT"), None);
    }

    #[test]
    fn dotenv_values_do_not_override_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(
            &path,
            "# comment\nexport MLSERVER_HTTP_PORT=9000\nMLSERVER_GRPC_PORT = 9001 # inline\n\
             MLSERVER_SERVER_NAME='a # b'\nMLSERVER_ROOT_PATH=\"/x\\ty\"\n1BAD KEY=3\nMLSERVER_X=\"open\n",
        )
        .unwrap();
        let mut env = Env::new([("MLSERVER_HTTP_PORT", "8000")], dir.path());
        env.add_dotenv_file(&path);
        assert_eq!(env.get("MLSERVER_HTTP_PORT"), Some("8000"));
        assert_eq!(env.get("MLSERVER_GRPC_PORT"), Some("9001"));
        assert_eq!(env.get("MLSERVER_SERVER_NAME"), Some("a # b"));
        assert_eq!(env.get("MLSERVER_ROOT_PATH"), Some("/x\ty"));
        assert_eq!(env.get("MLSERVER_X"), None);
        assert_eq!(env.warnings().len(), 2, "{:?}", env.warnings());
        assert!(env.warnings()[0].contains("line 6"), "{:?}", env.warnings());
        assert!(env.warnings()[1].contains("line 7"), "{:?}", env.warnings());
    }

    #[test]
    fn process_environment_is_read() {
        let env = Env::from_process();
        assert_eq!(
            env.get("PATH").map(str::to_string),
            std::env::var("PATH").ok()
        );
        assert_eq!(env.cwd(), std::env::current_dir().unwrap());
    }

    #[test]
    fn missing_dotenv_file_is_not_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = Env::new(Vec::<(String, String)>::new(), dir.path());
        env.add_dotenv_file(&dir.path().join(".env"));
        assert!(env.warnings().is_empty());
    }
}
