//! Helpers for the end-to-end tests: a temporary model repository, the real `sdserve` binary
//! started as a child process on loopback ports, an HTTP client whose every call has a
//! timeout, a Prometheus text parser, a real Prometheus server, and the Python environment of
//! the client tests.
//!
//! Every test starts its own server on port 0 (the kernel picks free ports; they are read
//! back from the server's log), so tests run in parallel without clashing.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
pub use reqwest::Method;
pub use reqwest::blocking::{Client, RequestBuilder};
pub use serde_json::{Value, json};

/// Longest wait for a server to listen and load the tiny model.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of every HTTP call a test makes.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The built-in implementation name for model-settings.json.
pub const BUILTIN: &str = "sdserve.StableDiffusion";
/// The buckets of every histogram the monitoring document defines, as exposed.
pub const DOCUMENT_BUCKETS: &[&str] = &[
    "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5", "5.0",
    "7.5", "10.0", "+Inf",
];

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The tiny SD 1.x model shipped in the repository (64×64 images).
pub fn tiny_model() -> PathBuf {
    let dir = workspace_root().join("models").join("tiny-sd1");
    assert!(
        dir.join("model_index.json").is_file(),
        "the tiny model is missing at {}",
        dir.display()
    );
    dir.canonicalize()
        .expect("canonical path of the tiny model")
}

/// The `sdserve` binary of the same build profile as the running test
/// (`target/<profile>/sdserve`), or `$SDSERVE_BIN`.
pub fn sdserve_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SDSERVE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    // The test runs from target/<profile>/deps/.
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is under target/<profile>/deps");
    let bin = profile_dir.join(format!("sdserve{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        let profile = profile_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flag = if profile == "release" {
            " --release"
        } else {
            ""
        };
        panic!(
            "the sdserve binary is not at {}: run `cargo build{flag} -p sdserve` first \
             (`cargo test --workspace` builds it too)",
            bin.display()
        );
    }
    bin
}

/// A port that was free a moment ago (for tests of port settings that cannot use 0).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local address").port()
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- model repository ---------------------------------------------------------------------

/// A temporary model repository (`repo/`) plus a scratch folder (`assets/`) outside it for
/// model folders that must not be scanned.
pub struct Repo {
    dir: tempfile::TempDir,
}

impl Default for Repo {
    fn default() -> Self {
        Self::new()
    }
}

impl Repo {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sdserve-e2e-")
            .tempdir()
            .expect("temporary folder");
        std::fs::create_dir(dir.path().join("repo")).expect("repo folder");
        std::fs::create_dir(dir.path().join("assets")).expect("assets folder");
        Self { dir }
    }

    /// The model repository root, given to `sdserve start`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// The scratch folder beside the repository.
    pub fn assets(&self) -> PathBuf {
        self.dir.path().join("assets")
    }

    /// Writes a file below the repository root, creating folders.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("file has a parent"))
            .expect("creating folders");
        std::fs::write(&path, contents).expect("writing a file");
        path
    }

    /// `settings.json` of the repository.
    pub fn settings(&self, settings: Value) -> PathBuf {
        self.write("settings.json", settings.to_string())
    }

    /// `<folder>/model-settings.json`, written as given.
    pub fn model(&self, folder: &str, settings: Value) -> PathBuf {
        self.write(
            &format!("{folder}/model-settings.json"),
            serde_json::to_string_pretty(&settings).expect("json"),
        )
    }

    /// A model named `name` served from the tiny model (absolute `parameters.uri`).
    pub fn tiny(&self, name: &str) -> PathBuf {
        self.model(name, tiny_settings(name, None))
    }

    /// Like [`Repo::tiny`], with `parameters.version`.
    pub fn tiny_versioned(&self, name: &str, version: &str) -> PathBuf {
        self.model(name, tiny_settings(name, Some(version)))
    }

    /// A copy of the tiny model under `assets/<name>` made of symbolic links to its files
    /// (the weights are not copied); callers may replace single files in it.
    pub fn linked_tiny(&self, name: &str) -> PathBuf {
        let target = self.assets().join(name);
        link_tree(&tiny_model(), &target);
        target
    }

    /// A model whose load blocks until [`SlowLoad::release`]: its `unet/config.json` is a
    /// named pipe that the loader's read waits on.
    pub fn slow_model(&self, name: &str) -> SlowLoad {
        let folder = self.linked_tiny(name);
        let config = folder.join("unet").join("config.json");
        let contents = std::fs::read(&config).expect("reading the UNet config");
        std::fs::remove_file(&config).expect("removing the link");
        let c = CString::new(config.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            config.display(),
            std::io::Error::last_os_error()
        );
        let mut settings = tiny_settings(name, None);
        settings["parameters"]["uri"] = json!(folder);
        self.model(name, settings);
        SlowLoad {
            fifo: config,
            contents,
        }
    }
}

/// model-settings.json for a model served from the tiny model. Two denoising steps by
/// default keep requests that do not ask for more fast.
pub fn tiny_settings(name: &str, version: Option<&str>) -> Value {
    let mut s = json!({
        "name": name,
        "implementation": BUILTIN,
        "parameters": {
            "uri": tiny_model(),
            "extra": {"defaults": {"num_inference_steps": 2}}
        }
    });
    if let Some(v) = version {
        s["parameters"]["version"] = json!(v);
    }
    s
}

fn link_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a folder");
    for entry in std::fs::read_dir(from).expect("reading the tiny model") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        // The tiny model's own settings would turn the copy into a second model.
        if name == "model-settings.json" {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        if src.is_dir() {
            link_tree(&src, &dst);
        } else {
            std::os::unix::fs::symlink(&src, &dst).expect("symbolic link");
        }
    }
}

/// The pipe behind a slow model's `unet/config.json`.
pub struct SlowLoad {
    fifo: PathBuf,
    contents: Vec<u8>,
}

impl SlowLoad {
    /// Lets the load go on: waits (bounded) for the server to open the pipe, then writes
    /// the real file through it.
    pub fn release(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pipe = loop {
            // Non-blocking open fails with ENXIO until the reader has opened its end.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("the server never opened {}: {e}", self.fifo.display()),
            }
        };
        // The config is far smaller than a pipe buffer, so this write does not block.
        pipe.write_all(&self.contents)
            .expect("writing the UNet config into the pipe");
    }
}

// ---- the server process ---------------------------------------------------------------------

#[derive(Default)]
struct LogState {
    text: String,
    /// Streams that reached end of file (stdout and stderr).
    closed: usize,
}

type Log = Arc<(Mutex<LogState>, Condvar)>;

fn collect(stream: impl Read + Send + 'static, log: Log) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let (m, cv) = &*log;
                    let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
                    s.text.push_str(text.trim_end_matches('\n'));
                    s.text.push('\n');
                    cv.notify_all();
                }
            }
        }
        let (m, cv) = &*log;
        m.lock().unwrap_or_else(|e| e.into_inner()).closed += 1;
        cv.notify_all();
    });
}

/// How to start `sdserve start <repo>`; see [`launch`].
pub struct Launch {
    folder: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// `ulimit -v`: the process's address-space limit in bytes.
    address_space: Option<u64>,
    http_port_flag: bool,
    metrics_port_flag: bool,
    grpc_port_flag: bool,
    wait_ready: bool,
}

/// `sdserve start <repo> --host 127.0.0.1 --http-port 0 --metrics-port 0 --grpc-port 0`, with
/// no `MLSERVER_*`, `RUST_LOG` or `NO_COLOR` variable inherited from the test's environment.
pub fn launch(repo: &Repo) -> Launch {
    launch_folder(&repo.path())
}

/// Like [`launch`], for any folder.
pub fn launch_folder(folder: &Path) -> Launch {
    Launch {
        folder: folder.to_path_buf(),
        args: Vec::new(),
        env: Vec::new(),
        address_space: None,
        http_port_flag: true,
        metrics_port_flag: true,
        grpc_port_flag: true,
        wait_ready: true,
    }
}

impl Launch {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts the server under an address-space limit (`ulimit -v`, as a pod's memory limit
    /// bounds what it may allocate): an allocation beyond it fails.
    pub fn address_space_limit(mut self, bytes: u64) -> Self {
        self.address_space = Some(bytes);
        self
    }

    /// Leaves `--http-port` out (the port comes from settings.json or the environment).
    pub fn no_http_port_flag(mut self) -> Self {
        self.http_port_flag = false;
        self
    }

    /// Leaves `--metrics-port` out.
    pub fn no_metrics_port_flag(mut self) -> Self {
        self.metrics_port_flag = false;
        self
    }

    /// Leaves `--grpc-port` out.
    pub fn no_grpc_port_flag(mut self) -> Self {
        self.grpc_port_flag = false;
        self
    }

    /// Returns as soon as the HTTP listener is up, without waiting for the models.
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(sdserve_bin());
        cmd.arg("start")
            .arg(&self.folder)
            .args(["--host", "127.0.0.1"]);
        if self.http_port_flag {
            cmd.args(["--http-port", "0"]);
        }
        if self.metrics_port_flag {
            cmd.args(["--metrics-port", "0"]);
        }
        if self.grpc_port_flag {
            cmd.args(["--grpc-port", "0"]);
        }
        cmd.args(&self.args);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("MLSERVER_") || k == "RUST_LOG" || k == "NO_COLOR" {
                cmd.env_remove(k.as_ref());
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Relative paths in settings must not depend on where the tests run.
        cmd.current_dir(self.folder.parent().unwrap_or(&self.folder));
        if let Some(bytes) = self.address_space {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// Starts the server and waits until it listens (and, unless [`Launch::no_wait_ready`],
    /// until `/v2/health/ready` is 200).
    pub fn start(self) -> Server {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", sdserve_bin().display()));
        let log: Log = Arc::default();
        collect(child.stdout.take().expect("stdout"), log.clone());
        collect(child.stderr.take().expect("stderr"), log.clone());
        let mut server = Server {
            child,
            http_port: 0,
            log,
            client: client(),
        };
        let line = server.wait_log_line("HTTP server running on http://", START_TIMEOUT);
        server.http_port = port_of(&line);
        if self.wait_ready {
            server.wait_ready();
        }
        server
    }

    /// Runs the command to its end (for startups that must fail); kills it after `timeout`.
    pub fn run_to_exit(self, timeout: Duration) -> Exit {
        let mut cmd = self.command();
        run_command(&mut cmd, timeout)
    }
}

/// How a process that was expected to end ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with piped output; panics if it does not finish within `timeout`.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Exit {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting a process");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the process") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not exit within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Exit {
        status,
        stdout,
        stderr,
    }
}

fn port_of(line: &str) -> u16 {
    let url = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in log line {line:?}"))
}

/// An HTTP client for tests: a timeout on every call, no proxy, no automatic gzip (tests
/// look at the raw encoding).
pub fn client() -> Client {
    Client::builder()
        .timeout(CALL_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .gzip(false)
        .build()
        .expect("HTTP client")
}

/// A running `sdserve start`, killed when dropped (its log is printed if the test failed).
pub struct Server {
    child: Child,
    pub http_port: u16,
    log: Log,
    client: Client,
}

impl Server {
    /// Everything the server wrote to stderr and stdout so far.
    pub fn log(&self) -> String {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    /// Waits for a log line containing `needle` and returns it; panics with the log if
    /// the server exits or `timeout` passes first.
    pub fn wait_log_line(&mut self, needle: &str, timeout: Duration) -> String {
        match self.find_log_line(needle, timeout) {
            Some(line) => line,
            None => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "sdserve never logged {needle:?} within {timeout:?} (exit status: {status:?}); log:\n{}",
                    self.log()
                );
            }
        }
    }

    fn find_log_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut state = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(line) = state.text.lines().find(|l| l.contains(needle)) {
                return Some(line.to_owned());
            }
            let now = Instant::now();
            if state.closed == 2 || now >= deadline {
                return None;
            }
            state = cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The metrics listener's port, from its log line (panics if metrics are disabled).
    pub fn metrics_port(&self) -> u16 {
        let line = self
            .find_log_line("Metrics server running on http://", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("sdserve logged no metrics listener; log:\n{}", self.log()));
        port_of(&line)
    }

    /// The gRPC listener's port, from its log line.
    pub fn grpc_port(&self) -> u16 {
        let line = self
            .find_log_line("gRPC server running on http://", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("sdserve logged no gRPC listener; log:\n{}", self.log()));
        port_of(&line)
    }

    /// Whether the log announces a metrics listener (check after the server is ready).
    pub fn has_metrics_listener(&self) -> bool {
        self.log().contains("Metrics server running on")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `None` while the process runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("polling the server process")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Polls `/v2/health/ready` until 200; panics with the log on timeout or exit.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = self
                .client
                .get(self.url("/v2/health/ready"))
                .timeout(Duration::from_secs(5))
                .send()
                && r.status() == 200
            {
                return;
            }
            if let Some(status) = self.exit_status() {
                panic!(
                    "sdserve exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "sdserve was not ready within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends a request built with [`Server::client`] and reads the whole answer.
    pub fn send(&self, request: RequestBuilder) -> Reply {
        let response = request
            .send()
            .unwrap_or_else(|e| panic!("HTTP request failed: {e}; log:\n{}", self.log()));
        Reply::read(response)
    }

    pub fn request(&self, method: Method, path: &str) -> Reply {
        self.send(self.client.request(method, self.url(path)))
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
    }

    pub fn post_bytes(&self, path: &str, body: impl Into<Vec<u8>>) -> Reply {
        self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body.into()),
        )
    }

    /// `POST /v2/models/{model}/infer`.
    pub fn infer(&self, model: &str, body: &Value) -> Reply {
        self.post(&format!("/v2/models/{model}/infer"), body)
    }

    /// One scrape of the metrics endpoint.
    /// The value of an unlabelled gauge in one scrape.
    pub fn gauge(&self, name: &str) -> f64 {
        self.scrape().value(name, &[])
    }

    pub fn scrape(&self) -> Metrics {
        self.scrape_path("/metrics")
    }

    pub fn scrape_path(&self, path: &str) -> Metrics {
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port());
        let r = Reply::read(self.client.get(url).send().expect("scraping metrics"));
        assert_eq!(
            r.status,
            200,
            "metrics endpoint answered {}: {}",
            r.status,
            r.text()
        );
        Metrics::parse(&r.text())
    }

    /// Scrapes until no REST request is in progress, so that every finished request is
    /// counted (the REST families record a request after its last byte is written, which
    /// can be a moment after the client has read it).
    pub fn scrape_settled(&self) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.scrape();
            let busy: f64 = m
                .samples
                .iter()
                .filter(|s| s.name.ends_with("_requests_in_progress"))
                .map(|s| s.value)
                .sum();
            if busy == 0.0 || Instant::now() >= deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- sdserve log (port {}) ----\n{}",
                self.http_port,
                self.log()
            );
        }
    }
}

// ---- replies --------------------------------------------------------------------------------

/// A whole HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// As received (still gzip-compressed when the server compressed it).
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn read(response: reqwest::blocking::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let raw = response
            .bytes()
            .expect("reading the response body")
            .to_vec();
        Self {
            status,
            headers,
            raw,
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_owned())
    }

    /// The body, decompressed if the server gzip-compressed it.
    pub fn body(&self) -> Vec<u8> {
        if self.header("content-encoding").as_deref() == Some("gzip") {
            gunzip(&self.raw)
        } else {
            self.raw.clone()
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body()).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The `error` string of a JSON error body.
    pub fn error(&self) -> String {
        match self.json().get("error") {
            Some(Value::String(s)) => s.clone(),
            _ => panic!(
                "status {}: no \"error\" string in {}",
                self.status,
                self.text()
            ),
        }
    }

    /// Panics with the body unless the status is `status`.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }
}

// ---- requests and images --------------------------------------------------------------------

/// A V2 request with one prompt and the given request-level `parameters`.
pub fn prompt_request(prompt: &str, parameters: Value) -> Value {
    json!({
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [prompt],
                    "parameters": {"content_type": "str"}}],
        "parameters": parameters
    })
}

/// Width and height of a base64 PNG, after decoding every pixel.
pub fn png_size(b64: &str) -> (u32, u32) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("image is standard base64");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("image is a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG buffer size")];
    let frame = reader.next_frame(&mut buf).expect("PNG pixels decode");
    (frame.width, frame.height)
}

/// The size of every image of an infer response, in order.
pub fn image_sizes(response: &Value) -> Vec<(u32, u32)> {
    let outputs = response["outputs"].as_array().expect("outputs");
    let image = outputs
        .iter()
        .find(|o| o["name"] == "image")
        .expect("an 'image' output");
    assert_eq!(image["datatype"], "BYTES");
    assert_eq!(image["parameters"]["content_type"], "base64");
    image["data"]
        .as_array()
        .expect("image data")
        .iter()
        .map(|d| png_size(d.as_str().expect("string")))
        .collect()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// Whether `s` is a random (version 4) UUID in the canonical hyphenated form.
pub fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

// ---- Prometheus text ------------------------------------------------------------------------

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
    /// Family name → type, from `# TYPE` lines.
    pub types: BTreeMap<String, String>,
}

fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    /// Parses Prometheus text format 0.0.4; panics on a malformed line.
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next())
                else {
                    panic!("malformed TYPE line {line:?}");
                };
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Self {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// The sample with exactly these labels.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want = labels_of(labels);
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Metrics::find`], panicking with the family's samples when absent.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?}; samples of that name:\n{}",
                self.dump(name)
            );
        })
    }

    /// Every sample named `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The sample lines named `name`, for failure messages.
    pub fn dump(&self, name: &str) -> String {
        self.series(name)
            .iter()
            .map(|s| format!("{}{:?} {}\n", s.name, s.labels, s.value))
            .collect()
    }

    /// Names of the families declared as `kind`.
    pub fn families_of_type(&self, kind: &str) -> Vec<String> {
        self.types
            .iter()
            .filter(|(_, k)| k.as_str() == kind)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Each series of histogram `family` (labels without `le`) → its `le` values in order.
    pub fn bucket_bounds(&self, family: &str) -> BTreeMap<BTreeMap<String, String>, Vec<String>> {
        let mut out: BTreeMap<BTreeMap<String, String>, Vec<String>> = BTreeMap::new();
        for s in self.series(&format!("{family}_bucket")) {
            let mut labels = s.labels.clone();
            let le = labels
                .remove("le")
                .unwrap_or_else(|| panic!("{family}_bucket sample without le"));
            out.entry(labels).or_default().push(le);
        }
        out
    }
}

fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("malformed sample line {line:?}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            // Skip separators, then read `key="value"` or the closing brace.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                bad()
            };
            if c == '}' {
                break start + 1;
            }
            let mut key_end = start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = after[start..key_end].to_owned();
            if chars.next().map(|(_, c)| c) != Some('"') {
                bad();
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bad(),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => bad(),
                }
            }
            labels.insert(key, value);
        };
        rest = &after[end..];
    }
    let value_text = rest.split_whitespace().next().unwrap_or_else(|| bad());
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad()),
    };
    Sample {
        name,
        labels,
        value,
    }
}

// ---- external tools: Prometheus and Python --------------------------------------------------

/// The file `name` in a folder of `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `prometheus` or `promtool`, both shipped by Debian's `prometheus` package. When missing, the
/// package is installed if the tests run as root with apt; otherwise this panics saying so.
pub fn prometheus_tool(name: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = on_path(name) {
        return p;
    }
    let hint = "install Debian's prometheus package, which ships prometheus and promtool: \
                `apt-get install -y --no-install-recommends prometheus` (.ci/run does)";
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || on_path("apt-get").is_none() {
        panic!("{name} is not on PATH and cannot be installed from here: {hint}");
    }
    eprintln!("{name} is not on PATH: installing Debian's prometheus package");
    let apt = |args: &[&str]| {
        run_command(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(900),
        )
    };
    let install = ["install", "-y", "--no-install-recommends", "prometheus"];
    let mut exit = apt(&install);
    if !exit.status.success() {
        // A fresh machine may have no package lists yet.
        apt(&["update"]);
        exit = apt(&install);
    }
    assert!(
        exit.status.success(),
        "apt-get install prometheus failed ({}): {}\n{hint}",
        exit.status,
        exit.stderr
    );
    on_path(name).unwrap_or_else(|| panic!("{name} is still not on PATH after installing: {hint}"))
}

/// A real `prometheus` server on loopback, with its configuration and storage in a temporary
/// folder; killed when dropped (its log is printed if the test failed).
pub struct Prometheus {
    child: Child,
    pub port: u16,
    log: Log,
    client: Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Writes `config` as `prometheus.yml` and each of `files` (name, contents) beside it,
    /// starts `prometheus` on a free loopback port and waits until it is ready.
    pub fn start(config: &str, files: &[(&str, &[u8])]) -> Self {
        let bin = prometheus_tool("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("sdserve-prometheus-")
            .tempdir()
            .expect("temporary folder");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("writing a Prometheus file");
        }
        let http = client();
        // The port was free when picked but another process may bind it first: a start
        // that fails is retried on another port.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let log: Log = Arc::default();
            collect(child.stdout.take().expect("stdout"), log.clone());
            collect(child.stderr.take().expect("stderr"), log.clone());
            let ready = format!("http://127.0.0.1:{port}/-/ready");
            let deadline = Instant::now() + START_TIMEOUT;
            let outcome = loop {
                if let Ok(r) = http.get(&ready).timeout(Duration::from_secs(5)).send()
                    && r.status() == 200
                {
                    break Ok(());
                }
                if let Some(status) = child.try_wait().expect("polling prometheus") {
                    break Err(format!("prometheus exited ({status})"));
                }
                if Instant::now() >= deadline {
                    break Err(format!("prometheus not ready within {START_TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            match outcome {
                Ok(()) => {
                    return Prometheus {
                        child,
                        port,
                        log,
                        client: http,
                        _dir: dir,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = log.0.lock().unwrap_or_else(|e| e.into_inner()).text.clone();
                    failures.push(format!("port {port}: {e}; log:\n{text}"));
                }
            }
        }
        panic!("prometheus did not start:\n{}", failures.join("\n"));
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET` of an HTTP API path; returns the `data` of a `"status": "success"` answer.
    pub fn api(&self, path: &str) -> Value {
        let r = Reply::read(
            self.client
                .get(self.url(path))
                .send()
                .unwrap_or_else(|e| panic!("GET {path} on prometheus: {e}")),
        );
        let body = r.json();
        assert_eq!(body["status"], "success", "GET {path}: {}", r.text());
        body["data"].clone()
    }

    /// An instant query through `/api/v1/query` at `time` (Unix seconds; `None`: now).
    /// Returns `data` (`resultType` and `result`), or Prometheus' error for a query that does
    /// not parse or cannot run.
    pub fn try_query(&self, expr: &str, time: Option<f64>) -> Result<Value, String> {
        let mut form = vec![("query", expr.to_owned())];
        if let Some(t) = time {
            form.push(("time", format!("{t:.3}")));
        }
        let r = Reply::read(
            self.client
                .post(self.url("/api/v1/query"))
                .form(&form)
                .send()
                .unwrap_or_else(|e| panic!("querying prometheus: {e}")),
        );
        let body = r.json();
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "{} {}: {}",
                r.status,
                body["errorType"].as_str().unwrap_or(""),
                body["error"].as_str().unwrap_or(&r.text())
            ))
        }
    }

    /// Like [`Prometheus::try_query`], panicking on an error.
    #[track_caller]
    pub fn query(&self, expr: &str, time: Option<f64>) -> Value {
        self.try_query(expr, time)
            .unwrap_or_else(|e| panic!("query {expr:?} failed: {e}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log (port {}) ----\n{}",
                self.port,
                self.log()
            );
        }
    }
}

/// The virtual environment of the Python client tests at `target/py-venv`: created with
/// `python3 -m venv` when missing, and given `tests/python/requirements.txt` (from PyPI)
/// whenever that file differs from what the environment was last installed from. Returns
/// the environment's `python`.
pub fn python_venv() -> PathBuf {
    let root = workspace_root();
    let venv = root.join("target").join("py-venv");
    let python = venv.join("bin").join("python");
    let requirements_path = root.join("tests").join("python").join("requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", requirements_path.display()));
    // A copy of the requirements the environment was installed from.
    let stamp = venv.join("sdserve-requirements.txt");
    let check = |exit: Exit, what: &str| {
        assert!(
            exit.status.success(),
            "{what} failed ({}):\n{}\n{}",
            exit.status,
            exit.stdout,
            exit.stderr
        );
    };
    if !python.is_file() {
        let python3 = on_path("python3").unwrap_or_else(|| {
            panic!("python3 is not on PATH: install it (Debian: python3 python3-venv)")
        });
        eprintln!("creating the Python environment {}", venv.display());
        check(
            run_command(
                Command::new(python3).args(["-m", "venv"]).arg(&venv),
                Duration::from_secs(300),
            ),
            "python3 -m venv (Debian needs the python3-venv package)",
        );
    }
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
        eprintln!(
            "installing {} into {}",
            requirements_path.display(),
            venv.display()
        );
        check(
            run_command(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "-q",
                        "-r",
                    ])
                    .arg(&requirements_path),
                Duration::from_secs(1200),
            ),
            "pip install -r tests/python/requirements.txt",
        );
        std::fs::write(&stamp, &requirements).expect("writing the requirements stamp");
    }
    python
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_escaped_labels() {
        let m = Metrics::parse(
            "# TYPE a_total counter\na_total{path=\"/v2/models/{model_name}/infer\",q=\"x\\\"y\"} 3.0\nb 1e-3\n",
        );
        assert_eq!(
            m.value(
                "a_total",
                &[("path", "/v2/models/{model_name}/infer"), ("q", "x\"y")]
            ),
            3.0
        );
        assert_eq!(m.value("b", &[]), 0.001);
        assert_eq!(m.types["a_total"], "counter");
        assert!(
            m.find("a_total", &[("path", "/v2/models/{model_name}/infer")])
                .is_none()
        );
    }

    #[test]
    fn ports_and_ids() {
        assert_eq!(
            port_of("INFO sdserve::server: HTTP server running on http://127.0.0.1:4123"),
            4123
        );
        assert!(is_uuid_v4("96e0ac3b-6dba-4edb-a998-b2f37f636204"));
        assert!(!is_uuid_v4("req-42"));
    }
}

// ---- Triton's binary tensor extension -------------------------------------------------------

/// A serialised BYTES tensor: each element a 4-byte little-endian length, then its bytes.
pub fn bytes_tensor(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

/// The JSON header followed by the tensors; returns the body and the header's length.
pub fn binary_body(header: &Value, tensors: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = header.to_string().into_bytes();
    let n = body.len();
    for t in tensors {
        body.extend_from_slice(t);
    }
    (body, n)
}

pub fn post_binary(s: &Server, path: &str, header_length: &str, body: Vec<u8>) -> Reply {
    s.send(
        s.client()
            .post(s.url(path))
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", header_length)
            .body(body),
    )
}

/// Resident memory of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS of the server")
}

/// Runs `deploy/kubernetes/validate.py` (strict schemas of Kubernetes, KServe, KEDA and the
/// Prometheus Operator) on `args` in the test Python environment.
pub fn validate_manifests(args: &[&str]) -> Exit {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let python = PYTHON.get_or_init(python_venv);
    run_command(
        Command::new(python)
            .arg(workspace_root().join("deploy/kubernetes/validate.py"))
            .args(args)
            .current_dir(workspace_root())
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Duration::from_secs(300),
    )
}

/// Every manifest under `deploy/kubernetes`, validated, as `{file: [documents]}`.
pub fn kubernetes_manifests() -> Value {
    let exit = validate_manifests(&["--dump", "deploy/kubernetes"]);
    assert!(
        exit.status.success(),
        "the manifests do not validate:\n{}{}",
        exit.stdout,
        exit.stderr
    );
    serde_json::from_str(&exit.stdout).expect("the validator's JSON dump")
}

/// The one document of `kind` in `deploy/kubernetes/<file>`.
pub fn manifest<'a>(all: &'a Value, file: &str, kind: &str) -> &'a Value {
    let docs = all[format!("deploy/kubernetes/{file}")]
        .as_array()
        .unwrap_or_else(|| panic!("no manifest file {file}"));
    let mut of_kind = docs.iter().filter(|d| d["kind"] == kind);
    let doc = of_kind
        .next()
        .unwrap_or_else(|| panic!("no {kind} in {file}"));
    assert!(of_kind.next().is_none(), "several {kind} in {file}");
    doc
}

/// A V2 generation on model `tiny` far longer than any test (150 steps at 512²), written by hand
/// on its own connection so that dropping the stream hangs up and cancels it. `token`: the
/// bearer token, when the server wants one.
pub fn held_generation(s: &Server, token: Option<&str>) -> std::net::TcpStream {
    let body = prompt_request(
        "a red circle",
        json!({"num_inference_steps": 150, "height": 512, "width": 512}),
    )
    .to_string();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.http_port)).expect("connecting");
    write!(
        stream,
        "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("sending the long request");
    stream
}
