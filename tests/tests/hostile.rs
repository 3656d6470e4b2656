//! A corpus of malformed and adversarial requests against the real server. Each must get its
//! 4xx with a JSON body holding an `error` string (and a bounded size), the server must stay
//! up, and a normal request sent right after it must succeed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use sdserve_tests::*;

/// Bodies up to 16 MiB pass the body limit, so that a 10 MB prompt reaches validation.
const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// No error answer may be larger than this, whatever the request.
const MAX_ERROR_BYTES: usize = 64 * 1024;
const INFER: &str = "/v2/models/tiny/infer";

struct Case {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Written by hand: a Content-Length that announces more than is sent.
    announced_only: Option<u64>,
    status: u16,
    /// Part of the expected `error` message.
    contains: &'static str,
}

fn case(name: &str, body: impl Into<Vec<u8>>, status: u16, contains: &'static str) -> Case {
    Case {
        name: name.to_owned(),
        method: "POST",
        path: INFER.to_owned(),
        headers: vec![("content-type", "application/json".to_owned())],
        body: body.into(),
        announced_only: None,
        status,
        contains,
    }
}

fn json_case(name: &str, body: Value, status: u16, contains: &'static str) -> Case {
    case(name, body.to_string(), status, contains)
}

fn prompt(data: Value, shape: Value) -> Value {
    json!({"name": "prompt", "shape": shape, "datatype": "BYTES", "data": data})
}

/// A request with one prompt, extra inputs and the given parameters.
fn with(extra_inputs: Vec<Value>, parameters: Value) -> Value {
    let mut inputs = vec![prompt(json!(["a hostile cat"]), json!([1]))];
    inputs.extend(extra_inputs);
    json!({"inputs": inputs, "parameters": parameters})
}

fn params(parameters: Value) -> Value {
    with(vec![], parameters)
}

fn tensor(name: &str, datatype: &str, shape: Value, data: Value) -> Value {
    json!({"name": name, "shape": shape, "datatype": datatype, "data": data})
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

fn corpus() -> Vec<Case> {
    let valid = prompt_request("a valid cat", json!({"num_inference_steps": 1})).to_string();
    let mut c = vec![
        // ---- not JSON at all, or not an object (422)
        case("empty body", "", 422, "JSON"),
        case("lone brace", "{", 422, "JSON"),
        case("plain text", "not json", 422, "JSON"),
        case("broken array", r#"{"inputs": [}"#, 422, "JSON"),
        case("trailing garbage", format!("{valid} xyz"), 422, "JSON"),
        case("null", "null", 422, ""),
        case("array", "[]", 422, ""),
        case("string", r#""just a string""#, 422, ""),
        case("number", "12345", 422, ""),
        case(
            "NaN literal",
            valid.replace(r#""num_inference_steps":1"#, r#""guidance_scale":NaN"#),
            422,
            "JSON",
        ),
        case(
            "Infinity literal",
            valid.replace(r#""num_inference_steps":1"#, r#""guidance_scale":Infinity"#),
            422,
            "JSON",
        ),
        case(
            "number out of range",
            valid.replace(r#""num_inference_steps":1"#, r#""guidance_scale":1e999"#),
            422,
            "JSON",
        ),
        case(
            "non-UTF-8 bytes in a string",
            [
                &br#"{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":[""#[..],
                b"\xff\xfe\xc3",
                br#""]}]}"#,
            ]
            .concat(),
            422,
            "JSON",
        ),
        case(
            "lone surrogate escape",
            valid.replace("a valid cat", r"\ud800"),
            422,
            "JSON",
        ),
        case(
            "byte order mark",
            [&b"\xef\xbb\xbf"[..], valid.as_bytes()].concat(),
            422,
            "JSON",
        ),
        case(
            "100000 nested arrays",
            nested(100_000, "[", "]", ""),
            422,
            "JSON",
        ),
        case(
            "deeply nested parameters",
            format!(
                r#"{{"inputs":[],"parameters":{}}}"#,
                nested(5000, r#"{"a":"#, "}", "1")
            ),
            422,
            "JSON",
        ),
        case(
            "duplicate top-level keys",
            format!(
                r#"{{"inputs":{},"inputs":5}}"#,
                json!([prompt(json!(["a"]), json!([1]))])
            ),
            422,
            "inputs",
        ),
        // ---- JSON, but not a V2 request (422)
        json_case(
            "inputs is an object",
            json!({"inputs": {"prompt": "a"}}),
            422,
            "inputs",
        ),
        json_case("inputs missing", json!({"parameters": {}}), 422, "inputs"),
        json_case("input is null", json!({"inputs": [null]}), 422, "inputs"),
        json_case(
            "input name is a number",
            json!({"inputs": [{"name": 7, "shape": [1], "datatype": "BYTES", "data": ["a"]}]}),
            422,
            "name",
        ),
        json_case(
            "shape is a string",
            json!({"inputs": [prompt(json!(["a"]), json!("1"))]}),
            422,
            "shape",
        ),
        json_case(
            "fractional shape",
            json!({"inputs": [prompt(json!(["a"]), json!([1.5]))]}),
            422,
            "shape",
        ),
        json_case(
            "shape of 1e30",
            json!({"inputs": [prompt(json!(["a"]), json!([1e30]))]}),
            422,
            "shape",
        ),
        case(
            "shape beyond 64 bits",
            r#"{"inputs":[{"name":"prompt","shape":[18446744073709551616],"datatype":"BYTES","data":["a"]}]}"#,
            422,
            "shape",
        ),
        json_case(
            "unknown datatype",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "FLOAT32", "data": ["a"]}]}),
            422,
            "datatype",
        ),
        json_case(
            "lower-case datatype",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "bytes", "data": ["a"]}]}),
            422,
            "datatype",
        ),
        json_case(
            "data missing",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES"}]}),
            422,
            "data",
        ),
        json_case(
            "parameters is a list",
            json!({"inputs": [prompt(json!(["a"]), json!([1]))], "parameters": [1, 2]}),
            422,
            "parameters",
        ),
        json_case(
            "id is a number",
            json!({"id": 42, "inputs": [prompt(json!(["a"]), json!([1]))]}),
            422,
            "id",
        ),
        json_case(
            "outputs is a string",
            json!({"inputs": [prompt(json!(["a"]), json!([1]))], "outputs": "image"}),
            422,
            "outputs",
        ),
        case(
            "200000 bad inputs",
            format!(r#"{{"inputs":[{}1]}}"#, "1,".repeat(200_000)),
            422,
            "inputs",
        ),
        // ---- a V2 request that breaks the diffusers contract (400)
        json_case(
            "shape larger than data",
            json!({"inputs": [prompt(json!(["a"]), json!([2]))]}),
            400,
            "needs 2",
        ),
        json_case(
            "data larger than shape",
            json!({"inputs": [prompt(json!(["a", "b"]), json!([1]))]}),
            400,
            "needs 1",
        ),
        json_case(
            "negative shape",
            json!({"inputs": [prompt(json!(["a"]), json!([-1]))]}),
            400,
            "negative",
        ),
        json_case(
            "huge shape",
            json!({"inputs": [prompt(json!(["a"]), json!([i64::MAX]))]}),
            400,
            "element",
        ),
        json_case(
            "shape whose product overflows",
            json!({"inputs": [prompt(json!(["a"]), json!([4294967296i64, 4294967296i64]))]}),
            400,
            "",
        ),
        json_case(
            "scalar shape for prompts",
            json!({"inputs": [prompt(json!("a"), json!([]))]}),
            400,
            "shape",
        ),
        json_case(
            "prompt as INT32",
            json!({"inputs": [{"name": "prompt", "shape": [1], "datatype": "INT32", "data": [1]}]}),
            400,
            "datatype",
        ),
        json_case(
            "prompt element is a number",
            json!({"inputs": [prompt(json!([5]), json!([1]))]}),
            400,
            "not a string",
        ),
        json_case(
            "prompt element is an object",
            json!({"inputs": [prompt(json!([{"a": 1}]), json!([1]))]}),
            400,
            "not a string",
        ),
        json_case(
            "NUL in the prompt",
            json!({"inputs": [prompt(json!(["a\u{0}b"]), json!([1]))]}),
            400,
            "NUL",
        ),
        json_case(
            "NUL in the negative prompt",
            params(json!({"negative_prompt": "x\u{0}"})),
            400,
            "NUL",
        ),
        json_case(
            "10 MB prompt",
            json!({"inputs": [prompt(json!(["p".repeat(10_000_000)]), json!([1]))]}),
            400,
            "10000000 bytes",
        ),
        json_case(
            "data nested 40 deep",
            json!({"inputs": [prompt(serde_json::from_str::<Value>(&nested(40, "[", "]", r#""a""#)).unwrap(), json!([1]))]}),
            400,
            "nested too deeply",
        ),
        json_case(
            "duplicate input names",
            json!({"inputs": [prompt(json!(["a"]), json!([1])), prompt(json!(["b"]), json!([1]))]}),
            400,
            "more than once",
        ),
        json_case(
            "unknown input",
            with(
                vec![tensor("mask", "FP32", json!([1]), json!([1.0]))],
                json!({}),
            ),
            400,
            "unknown input 'mask'",
        ),
        json_case(
            "unknown parameter",
            params(json!({"denoise": 0.5})),
            400,
            "unknown parameter 'denoise'",
        ),
        json_case(
            "unknown output",
            json!({"inputs": [prompt(json!(["a"]), json!([1]))], "outputs": [{"name": "images"}]}),
            400,
            "unknown output 'images'",
        ),
        json_case(
            "prompt missing",
            json!({"inputs": [tensor("seed", "INT64", json!([1]), json!([1]))]}),
            400,
            "missing input 'prompt'",
        ),
        json_case(
            "no prompts",
            json!({"inputs": [prompt(json!([]), json!([0]))]}),
            400,
            "at least one prompt",
        ),
        json_case(
            "17 prompts",
            json!({"inputs": [prompt(json!(vec!["a"; 17]), json!([17]))]}),
            400,
            "17 prompts",
        ),
        json_case(
            "unknown scheduler",
            params(json!({"scheduler": "warp_drive"})),
            400,
            "unknown scheduler 'warp_drive'",
        ),
        json_case(
            "scheduler is a number",
            params(json!({"scheduler": 3})),
            400,
            "scheduler",
        ),
        json_case(
            "height 0",
            params(json!({"height": 0})),
            400,
            "'height' is 0",
        ),
        json_case(
            "width 1e9",
            params(json!({"width": 1_000_000_000})),
            400,
            "'width' is 1000000000",
        ),
        json_case(
            "negative height",
            params(json!({"height": -64})),
            400,
            "'height' is -64",
        ),
        json_case(
            "height not a multiple of 8",
            params(json!({"height": 65})),
            400,
            "'height' is 65",
        ),
        json_case(
            "fractional width",
            params(json!({"width": 64.5})),
            400,
            "integer",
        ),
        json_case(
            "too many pixels",
            params(json!({"height": 2048, "width": 2048})),
            400,
            "pixels",
        ),
        json_case(
            "zero steps",
            params(json!({"num_inference_steps": 0})),
            400,
            "'num_inference_steps' is 0",
        ),
        json_case(
            "1e12 steps",
            params(json!({"num_inference_steps": 1_000_000_000_000i64})),
            400,
            "num_inference_steps",
        ),
        json_case(
            "steps as a string",
            params(json!({"num_inference_steps": "20"})),
            400,
            "integer",
        ),
        json_case(
            "steps as an INT32 input with two values",
            with(
                vec![tensor(
                    "num_inference_steps",
                    "INT32",
                    json!([2]),
                    json!([1, 2]),
                )],
                json!({}),
            ),
            400,
            "exactly one value",
        ),
        json_case(
            "steps as an FP32 input",
            with(
                vec![tensor(
                    "num_inference_steps",
                    "FP32",
                    json!([1]),
                    json!([2.0]),
                )],
                json!({}),
            ),
            400,
            "datatype",
        ),
        json_case(
            "input and parameter disagree",
            with(
                vec![tensor(
                    "num_inference_steps",
                    "INT32",
                    json!([1]),
                    json!([4]),
                )],
                json!({"num_inference_steps": 5}),
            ),
            400,
            "different values",
        ),
        json_case(
            "guidance 1e308",
            params(json!({"guidance_scale": 1e308})),
            400,
            "'guidance_scale'",
        ),
        json_case(
            "negative guidance",
            params(json!({"guidance_scale": -1})),
            400,
            "'guidance_scale'",
        ),
        json_case(
            "eta without ddim",
            params(json!({"eta": 0.5})),
            400,
            "only applies to the ddim",
        ),
        json_case(
            "eta above 1",
            params(json!({"eta": 2, "scheduler": "ddim"})),
            400,
            "'eta' is 2",
        ),
        json_case("negative seed", params(json!({"seed": -1})), 400, "'seed'"),
        case(
            "seed beyond 64 bits",
            params(json!({})).to_string().replace(
                r#""parameters":{}"#,
                r#""parameters":{"seed":18446744073709551616}"#,
            ),
            400,
            "'seed'",
        ),
        json_case(
            "100000 seeds",
            params(json!({"seed": (0..100_000).collect::<Vec<u64>>()})),
            400,
            "'seed' has 100000",
        ),
        json_case(
            "empty seed list",
            params(json!({"seed": []})),
            400,
            "at least one seed",
        ),
        json_case(
            "zero images per prompt",
            params(json!({"num_images_per_prompt": 0})),
            400,
            "'num_images_per_prompt' is 0",
        ),
        json_case(
            "1000 images per prompt",
            params(json!({"num_images_per_prompt": 1000})),
            400,
            "'num_images_per_prompt' is 1000",
        ),
        json_case(
            "negative prompts do not match",
            json!({"inputs": [prompt(json!(["a", "b"]), json!([2]))], "parameters": {"negative_prompt": ["x", "y", "z"]}}),
            400,
            "'negative_prompt' has 3",
        ),
        json_case(
            "latents of the wrong shape",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 4, 4]),
                    json!(vec![0.0; 64]),
                )],
                json!({}),
            ),
            400,
            "needs [1, 4, 8, 8]",
        ),
        json_case(
            "three-dimensional latents",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([4, 8, 8]),
                    json!(vec![0.0; 256]),
                )],
                json!({}),
            ),
            400,
            "latents",
        ),
        json_case(
            "FP16 latents",
            with(
                vec![tensor(
                    "latents",
                    "FP16",
                    json!([1, 4, 8, 8]),
                    json!(vec![0.0; 256]),
                )],
                json!({}),
            ),
            400,
            "datatype FP16",
        ),
        json_case(
            "latents shape and data disagree",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 8, 8]),
                    json!(vec![0.0; 10]),
                )],
                json!({}),
            ),
            400,
            "needs 256",
        ),
        json_case(
            "NaN latents as a string",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 8, 8]),
                    json!(vec!["NaN"; 256]),
                )],
                json!({}),
            ),
            400,
            "finite number",
        ),
        json_case(
            "latents beyond the FP32 range",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 8, 8]),
                    json!(vec![1e39; 256]),
                )],
                json!({}),
            ),
            400,
            "FP32 range",
        ),
        json_case(
            "latents with a huge shape",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 100_000, 100_000]),
                    json!([0.0]),
                )],
                json!({}),
            ),
            400,
            "too many elements",
        ),
        json_case(
            "base64 garbage as latents",
            with(
                vec![tensor(
                    "latents",
                    "FP32",
                    json!([1, 4, 8, 8]),
                    json!(["!!not base64, not numbers=="]),
                )],
                json!({}),
            ),
            400,
            "latents",
        ),
        json_case(
            "negative timeout",
            params(json!({"timeout": -5})),
            400,
            "'timeout'",
        ),
        json_case(
            "zero timeout",
            params(json!({"timeout": 0})),
            400,
            "'timeout'",
        ),
        json_case(
            "timeout as text",
            params(json!({"timeout": "soon"})),
            400,
            "'timeout'",
        ),
        json_case(
            "timeout of 1e20 ms",
            params(json!({"timeout": 1e20})),
            400,
            "'timeout'",
        ),
        json_case(
            "unsupported output format",
            params(json!({"output_format": "jpeg"})),
            400,
            "'output_format'",
        ),
        json_case(
            "100000 unknown parameters",
            params(Value::Object(
                (0..100_000).map(|i| (format!("p{i}"), json!(i))).collect(),
            )),
            400,
            "unknown parameter",
        ),
    ];

    // ---- the transport: encodings, sizes, routes
    let bomb = gzip(&vec![b' '; 64 * 1024 * 1024]);
    let mut gz = case("gzip bomb (64 MiB of spaces)", bomb, 413, "decompressed");
    gz.headers.push(("content-encoding", "gzip".into()));
    c.push(gz);
    let mut br = case(
        "unsupported content-encoding",
        valid.clone(),
        415,
        "Content-Encoding",
    );
    br.headers.push(("content-encoding", "br".into()));
    c.push(br);
    let mut plain = case("gzip declared, plain body", valid.clone(), 400, "gzip");
    plain.headers.push(("content-encoding", "gzip".into()));
    c.push(plain);
    let packed = gzip(valid.as_bytes());
    let mut truncated = case(
        "truncated gzip",
        packed[..packed.len() / 2].to_vec(),
        400,
        "gzip",
    );
    truncated.headers.push(("content-encoding", "gzip".into()));
    c.push(truncated);
    let mut deflate = case(
        "deflate garbage",
        b"\x78\x9c garbage".to_vec(),
        400,
        "deflate",
    );
    deflate.headers.push(("content-encoding", "deflate".into()));
    c.push(deflate);
    let mut lying = case(
        "announces a terabyte",
        Vec::new(),
        413,
        "max_request_body_bytes",
    );
    lying.announced_only = Some(1 << 40);
    c.push(lying);
    let mut text = case("text/plain garbage", "prompt=a cat", 422, "JSON");
    text.headers = vec![("content-type", "text/plain".into())];
    c.push(text);
    let mut bad_header = case(
        "binary header length not a number",
        valid.clone(),
        400,
        "Inference-Header-Content-Length",
    );
    bad_header
        .headers
        .push(("inference-header-content-length", "lots".into()));
    c.push(bad_header);
    let mut long_header = case(
        "binary header length beyond the body",
        valid.clone(),
        400,
        "Inference-Header-Content-Length",
    );
    long_header
        .headers
        .push(("inference-header-content-length", "99999999".into()));
    c.push(long_header);

    // (A body that is not a V2 request is a 422 first, as in MLServer, so these carry a valid one.)
    let mut unknown = case("unknown model", valid.clone(), 404, "not found");
    unknown.path = "/v2/models/no-such-model/infer".into();
    c.push(unknown);
    let mut nul_name = case("NUL in the model name", valid.clone(), 404, "not found");
    nul_name.path = "/v2/models/tiny%00/infer".into();
    c.push(nul_name);
    let mut version = case("unknown version", valid.clone(), 404, "not found");
    version.path = "/v2/models/tiny/versions/v9/infer".into();
    c.push(version);
    let mut get = case("GET on infer", "", 405, "Method Not Allowed");
    get.method = "GET";
    c.push(get);
    let mut stream = case("event stream with a broken body", "{", 422, "JSON");
    stream.path = "/v2/models/tiny/infer_stream".into();
    c.push(stream);
    let mut generate = json_case(
        "generate with a bad size",
        params(json!({"height": 7})),
        400,
        "'height' is 7",
    );
    generate.path = "/v2/models/tiny/generate".into();
    c.push(generate);
    let mut index = case("repository index with garbage", "\x00\x01", 422, "JSON");
    index.path = "/v2/repository/index".into();
    c.push(index);
    let mut load = case("repository load of a path", "", 400, "not a plain name");
    load.path = "/v2/repository/models/..%2Fetc/load".into();
    c.push(load);
    c
}

fn send(s: &Server, c: &Case) -> Reply {
    if let Some(announced) = c.announced_only {
        return send_announced(s, c, announced);
    }
    let method = Method::from_bytes(c.method.as_bytes()).expect("method");
    let mut req = s.client().request(method, s.url(&c.path));
    for (k, v) in &c.headers {
        req = req.header(*k, v);
    }
    s.send(req.body(c.body.clone()))
}

/// Announces a body it never sends; the answer must come without waiting for it.
fn send_announced(s: &Server, c: &Case, announced: u64) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", s.http_port)).expect("connecting");
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {announced}\r\n\r\n",
        c.path
    )
    .expect("writing");
    // Read the head and a Content-Length body; the connection stays open (the body never came).
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("reading the answer");
        assert!(n > 0, "connection closed without an answer");
        all.extend_from_slice(&buf[..n]);
        let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a Content-Length in the answer");
        if all.len() < end + 4 + length {
            continue;
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let mut headers = reqwest::header::HeaderMap::new();
        if head.contains("content-type: application/json") {
            headers.insert("content-type", "application/json".parse().unwrap());
        }
        return Reply {
            status,
            headers,
            raw: all[end + 4..end + 4 + length].to_vec(),
        };
    }
}

#[test]
fn every_hostile_request_gets_a_json_4xx_and_the_server_keeps_serving() {
    let repo = Repo::new();
    repo.tiny("tiny");
    repo.settings(json!({"max_request_body_bytes": BODY_LIMIT}));
    let mut s = launch(&repo).start();
    let normal = prompt_request("a normal cat", json!({"num_inference_steps": 1}));
    let corpus = corpus();
    assert!(corpus.len() >= 60, "only {} cases", corpus.len());

    let mut failures = Vec::new();
    let started = Instant::now();
    for c in &corpus {
        let r = send(&s, c);
        let mut problems = Vec::new();
        if r.status != c.status {
            problems.push(format!("status {} (expected {})", r.status, c.status));
        }
        if r.header("content-type").as_deref() != Some("application/json") {
            problems.push(format!("content-type {:?}", r.header("content-type")));
        }
        if r.raw.len() > MAX_ERROR_BYTES {
            problems.push(format!("{} bytes of error body", r.raw.len()));
        }
        match serde_json::from_slice::<Value>(&r.body()) {
            Ok(v) => match v.get("error").and_then(Value::as_str) {
                Some(e) if !e.is_empty() && e.contains(c.contains) => {}
                Some(e) => problems.push(format!("error {:?} lacks {:?}", truncate(e), c.contains)),
                None => problems.push(format!("no error string in {}", truncate(&v.to_string()))),
            },
            Err(e) => problems.push(format!("body is not JSON ({e}): {}", truncate(&r.text()))),
        }
        // The server is still there and still serves a normal request.
        if let Some(status) = s.exit_status() {
            panic!(
                "sdserve exited ({status}) after {:?}; log:\n{}",
                c.name,
                s.log()
            );
        }
        let after = s.infer("tiny", &normal);
        if after.status != 200 {
            problems.push(format!(
                "the normal request after it got {}: {}",
                after.status,
                truncate(&after.text())
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", c.name, problems.join("; ")));
        }
    }
    println!(
        "{} hostile requests in {:?}",
        corpus.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );

    // Nothing leaked: no slot held, nothing queued, and the server is ready.
    let m = s.scrape_settled();
    assert_eq!(m.value("sdserve_requests_in_flight", &[]), 0.0);
    assert_eq!(m.value("sdserve_queue_depth", &[]), 0.0);
    s.get("/v2/health/ready").expect(200);
}

fn truncate(s: &str) -> String {
    if s.len() <= 300 {
        return s.to_owned();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}
