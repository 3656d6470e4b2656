//! The gRPC server end to end, in process: the real engine and the tiny SD 1.x model
//! (`models/tiny-sd1`), the server on a loopback port, and a tonic client built from the same
//! generated code.
//!
//! A model named `slow` is the same tiny model with a pause after every denoising step, so
//! that deadlines and cancellation land mid-generation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdserve_engine::metrics::Registry;
use sdserve_engine::*;
use sdserve_generation::*;
use sdserve_grpc::pb::inference as pb;
use sdserve_grpc::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use sdserve_grpc::pb::inference::infer_parameter::ParameterChoice;
use sdserve_grpc::pb::inference::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use sdserve_grpc::pb::inference::model_repository::model_repository_service_client::ModelRepositoryServiceClient;
use sdserve_grpc::{GrpcConfig, GrpcMetrics};
use sdserve_pipeline::image::decode_png;
use sdserve_pipeline::{LoadOptions, StableDiffusion};
use sdserve_serving::{ModelRepository, RepositoryError, ServerInfo, Service};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-sd1")
}

/// Pauses after every step, then asks the engine whether to go on.
struct Paced<'a> {
    inner: &'a mut dyn StepControl,
    pause: Duration,
}

impl StepControl for Paced<'_> {
    fn after_step(&mut self, done: usize, total: usize) -> ControlFlow<StopReason> {
        std::thread::sleep(self.pause);
        self.inner.after_step(done, total)
    }
}

struct Slow {
    model: StableDiffusion,
    pause: Duration,
}

impl Generator for Slow {
    fn description(&self) -> &ModelDescription {
        self.model.description()
    }

    fn generate(
        &self,
        job: &Job,
        control: &mut dyn StepControl,
    ) -> Result<Vec<GeneratedImage>, GenerateError> {
        self.model.generate(
            job,
            &mut Paced {
                inner: control,
                pause: self.pause,
            },
        )
    }
}

struct TinyLoader;

impl ModelLoader for TinyLoader {
    fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Generator>, String> {
        let options = LoadOptions {
            adapters: spec.adapters.clone(),
            ..LoadOptions::cpu()
        };
        let model = StableDiffusion::load(&spec.uri, options).map_err(|e| e.to_string())?;
        Ok(match spec.extra.get("pause_ms").and_then(|v| v.as_u64()) {
            Some(ms) => Arc::new(Slow {
                model,
                pause: Duration::from_millis(ms),
            }),
            None => Arc::new(model),
        })
    }
}

fn spec(name: &str) -> ModelSpec {
    let mut extra = serde_json::Map::new();
    if name == "slow" {
        extra.insert("pause_ms".into(), 100.into());
    }
    ModelSpec {
        name: name.into(),
        version: None,
        uri: tiny_model(),
        extra,
        platform: String::new(),
        versions: vec![],
        content_type: None,
        max_batch_size: 0,
        max_batch_time: Duration::ZERO,
        defaults: GenerationDefaults {
            num_inference_steps: 2,
            ..Default::default()
        },
        limits: Limits::default(),
        // `styled`: the tiny model with its LoRA adapter `style`.
        adapters: (name == "styled")
            .then(|| AdapterDeclaration {
                name: "style".into(),
                path: tiny_model().join("../lora/sd1/style.safetensors"),
                scale: 1.0,
                default: false,
            })
            .into_iter()
            .collect(),
    }
}

/// The repository on "disk": `tiny` and `slow`.
struct Models;

impl ModelRepository for Models {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, RepositoryError> {
        Ok(vec![("slow".into(), None), ("tiny".into(), None)])
    }

    fn find(&self, name: &str) -> Result<Vec<ModelSpec>, RepositoryError> {
        match name {
            "tiny" | "slow" => Ok(vec![spec(name)]),
            _ => Err(RepositoryError::NotFound(name.into())),
        }
    }
}

type PlainHttp2 = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

struct Server {
    engine: Engine,
    registry: Arc<Registry>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Options {
    queue: usize,
    auth_token: Option<String>,
    config: GrpcConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            queue: 4,
            auth_token: None,
            config: GrpcConfig::default(),
        }
    }
}

async fn start(models: &[&str], options: Options) -> Server {
    let registry = Arc::new(Registry::new());
    let engine = Engine::new(
        EngineConfig {
            parallel_workers: 1,
            max_queue_size: options.queue,
            request_timeout: None,
            memory_budget: sdserve_engine::MemoryBudget::Off,
        },
        Arc::new(TinyLoader),
        &registry,
    );
    for m in models {
        engine
            .load(spec(m))
            .await
            .unwrap_or_else(|e| panic!("loading {m}: {e}"));
    }
    let metrics = Arc::new(GrpcMetrics::register(&registry));
    let service = Arc::new(Service {
        engine: engine.clone(),
        info: ServerInfo {
            server_name: "mlserver".into(),
            server_version: "1.7.1".into(),
            extensions: vec![],
            auth_token: options.auth_token,
            namespace: None,
        },
        repository: Arc::new(Models),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(sdserve_grpc::serve(
        listener,
        service,
        options.config,
        Some(metrics),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        engine,
        registry,
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Server {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel().await)
    }

    /// A client over a plain HTTP/2 connection, which (unlike tonic's channel) does not
    /// enforce `grpc-timeout` itself.
    fn plain_client(&self) -> GrpcInferenceServiceClient<PlainHttp2> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = format!("http://{}", self.addr).parse().unwrap();
        GrpcInferenceServiceClient::with_origin(client, origin)
    }

    /// Stops the listener and waits for the server task.
    async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("server stopped in time")
                .unwrap();
        }
    }

    fn metrics(&self) -> String {
        self.registry.render()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.engine.shutdown();
    }
}

fn param(c: ParameterChoice) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(c),
    }
}

fn prompt_input(prompts: &[&str]) -> InferInputTensor {
    InferInputTensor {
        name: "prompt".into(),
        datatype: "BYTES".into(),
        shape: vec![prompts.len() as i64],
        parameters: HashMap::from([(
            "content_type".into(),
            param(ParameterChoice::StringParam("str".into())),
        )]),
        contents: Some(pb::InferTensorContents {
            bytes_contents: prompts
                .iter()
                .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
                .collect(),
            ..Default::default()
        }),
    }
}

/// `prompt` on `model` with a seed and a step count, in typed contents.
fn infer_request(model: &str, prompt: &str, seed: i64, steps: i64) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        id: format!("req-{seed}"),
        parameters: HashMap::from([
            ("seed".into(), param(ParameterChoice::Int64Param(seed))),
            (
                "num_inference_steps".into(),
                param(ParameterChoice::Int64Param(steps)),
            ),
            (
                "guidance_scale".into(),
                param(ParameterChoice::DoubleParam(3.5)),
            ),
        ]),
        inputs: vec![prompt_input(&[prompt])],
        ..Default::default()
    }
}

fn string_param(p: &HashMap<String, pb::InferParameter>, key: &str) -> String {
    match p.get(key).and_then(|p| p.parameter_choice.clone()) {
        Some(ParameterChoice::StringParam(s)) => s,
        other => panic!("parameter {key} is {other:?}, not a string"),
    }
}

fn int_param(p: &HashMap<String, pb::InferParameter>, key: &str) -> i64 {
    match p.get(key).and_then(|p| p.parameter_choice.clone()) {
        Some(ParameterChoice::Int64Param(i)) => i,
        other => panic!("parameter {key} is {other:?}, not an int64"),
    }
}

fn metric_line(text: &str, line_start: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    assert!(
        c.server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = c
        .model_ready(pb::ModelReadyRequest {
            name: "tiny".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let err = c
        .model_ready(pb::ModelReadyRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "Model nope not found")
    );
    let err = c
        .model_ready(pb::ModelReadyRequest {
            name: "tiny".into(),
            version: "v9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "Model tiny with version v9 not found")
    );

    let meta = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (meta.name.as_str(), meta.version.as_str()),
        ("mlserver", "1.7.1")
    );

    let m = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "tiny".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    let m = m.into_inner();
    assert_eq!(m.name, "tiny");
    let prompt = m
        .inputs
        .iter()
        .find(|t| t.name == "prompt")
        .expect("prompt input");
    assert_eq!(
        (prompt.datatype.as_str(), prompt.shape.as_slice()),
        ("BYTES", &[-1][..])
    );
    assert_eq!(string_param(&prompt.parameters, "content_type"), "str");
    assert_eq!(m.outputs.len(), 1);
    assert_eq!(
        (m.outputs[0].name.as_str(), m.outputs[0].datatype.as_str()),
        ("image", "BYTES")
    );
    assert!(
        !m.outputs[0].parameters.contains_key("content_type"),
        "gRPC images are not base64"
    );
    assert_eq!(int_param(&m.parameters, "native_height"), 64);
    let schedulers: Vec<String> =
        serde_json::from_str(&string_param(&m.parameters, "schedulers")).unwrap();
    assert!(schedulers.contains(&"ddim".to_string()), "{schedulers:?}");
    let err = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_returns_png_bytes_and_raw_inputs_get_raw_outputs() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let started = Instant::now();
    let response = c
        .model_infer(infer_request("tiny", "a red circle", 7, 2))
        .await
        .unwrap();
    let ce_id = response
        .metadata()
        .get("ce-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let r = response.into_inner();
    eprintln!("typed-contents infer: {:?}", started.elapsed());
    assert_eq!(
        (
            r.model_name.as_str(),
            r.id.as_str(),
            r.model_version.as_str()
        ),
        ("tiny", "req-7", "")
    );
    assert_eq!(r.outputs.len(), 1);
    let out = &r.outputs[0];
    assert_eq!(
        (
            out.name.as_str(),
            out.datatype.as_str(),
            out.shape.as_slice()
        ),
        ("image", "BYTES", &[1, 1][..])
    );
    assert!(r.raw_output_contents.is_empty());
    let png = out.contents.as_ref().expect("contents").bytes_contents[0].clone();
    let (w, h, rgb) = decode_png(&png).expect("a PNG file");
    assert_eq!((w, h, rgb.len()), (64, 64, 64 * 64 * 3));
    assert_eq!(string_param(&r.parameters, "seeds"), "[7]");
    assert_eq!(int_param(&r.parameters, "num_inference_steps"), 2);
    assert_eq!(
        r.parameters["guidance_scale"].parameter_choice,
        Some(ParameterChoice::DoubleParam(3.5))
    );
    assert_eq!(
        ce_id.as_deref(),
        Some("req-7"),
        "CloudEvents headers in the trailing metadata"
    );

    // The same request in raw form: length-prefixed BYTES in, raw PNG out, same pixels.
    let mut raw_prompt = Vec::new();
    raw_prompt.extend_from_slice(&12u32.to_le_bytes());
    raw_prompt.extend_from_slice(b"a red circle");
    let mut req = infer_request("tiny", "", 7, 2);
    req.id.clear();
    req.inputs[0].contents = None;
    req.inputs.push(InferInputTensor {
        name: "guidance_scale".into(),
        datatype: "FP32".into(),
        shape: vec![1],
        ..Default::default()
    });
    req.parameters.remove("guidance_scale");
    req.raw_input_contents = vec![raw_prompt.into(), 3.5f32.to_le_bytes().to_vec().into()];
    req.outputs = vec![InferRequestedOutputTensor {
        name: "image".into(),
        parameters: HashMap::new(),
    }];
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert!(!r.id.is_empty(), "a fresh id when the request has none");
    assert!(r.outputs[0].contents.is_none());
    assert_eq!(r.raw_output_contents.len(), 1);
    let raw = &r.raw_output_contents[0];
    let len = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
    assert_eq!(raw.len(), 4 + len, "one length-prefixed element");
    assert_eq!(
        decode_png(&raw[4..]).unwrap().2,
        rgb,
        "same seed and settings, same image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_codes_with_the_rest_messages() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let err = c
        .model_infer(infer_request("nope", "a", 1, 2))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "Model nope not found")
    );

    let mut req = infer_request("tiny", "a", 1, 2);
    req.inputs[0].name = "promt".into();
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("unknown input 'promt'"),
        "{}",
        err.message()
    );

    let err = c
        .model_infer(infer_request("tiny", "a", 1, 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("num_inference_steps"),
        "{}",
        err.message()
    );

    let mut req = infer_request("tiny", "a", 1, 2);
    req.raw_input_contents = vec![bytes::Bytes::from_static(&[1, 0, 0, 0, b'a'])];
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("uses raw_input_contents"),
        "{}",
        err.message()
    );

    let text = server.metrics();
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_failure_total{model=\"nope\",version=\"None\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_failure_total{model=\"tiny\",version=\"None\"}"
        ),
        3.0
    );
    assert_eq!(
        metric_line(
            &text,
            "grpc_server_handled_total{grpc_code=\"INVALID_ARGUMENT\",grpc_method=\"ModelInfer\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"UNARY\"}"
        ),
        3.0
    );
}

/// gRPC parameters are scalars: `lora` travels as the JSON text of its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_is_chosen_by_a_json_string_parameter() {
    let server = start(&["styled"], Options::default()).await;
    let mut c = server.client().await;
    let request = |lora: Option<&str>| {
        let mut req = infer_request("styled", "a red circle", 3, 2);
        if let Some(l) = lora {
            req.parameters
                .insert("lora".into(), param(ParameterChoice::StringParam(l.into())));
        }
        req
    };
    let mut png = async |lora: Option<&str>| {
        let r = c.model_infer(request(lora)).await.unwrap().into_inner();
        r.outputs[0]
            .contents
            .as_ref()
            .expect("contents")
            .bytes_contents[0]
            .clone()
    };
    let base = png(None).await;
    let styled = png(Some(r#"{"style": 1.0}"#)).await;
    assert_ne!(base, styled);
    assert_eq!(png(Some(r#"{"style": 0}"#)).await, base);
    let err = c
        .model_infer(request(Some(r#"{"nope": 1}"#)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown adapter 'nope'"),
        "{}",
        err.message()
    );
}

/// The first bytes of a PNG file: not UTF-8 (0x89), as an image input would be.
const PNG_BYTES: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_text_reach_the_validator_as_bytes() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let bytes_input = |name: &str, data: &[u8]| InferInputTensor {
        name: name.into(),
        datatype: "BYTES".into(),
        shape: vec![1],
        contents: Some(pb::InferTensorContents {
            bytes_contents: vec![bytes::Bytes::copy_from_slice(data)],
            ..Default::default()
        }),
        ..Default::default()
    };
    // Typed contents: an image's bytes reach the validator as they are (this truncated PNG is
    // refused naming the element); an input the contract does not know is refused by name,
    // bytes and all; a prompt that is not text is refused by the contract, naming the element.
    let mut req = infer_request("tiny", "a cat", 1, 2);
    req.inputs.push(bytes_input("image", PNG_BYTES));
    let err = c.model_infer(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("input 'image' element 0 cannot be decoded"),
        "{}",
        err.message()
    );
    req.inputs.last_mut().unwrap().name = "picture".into();
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("unknown input 'picture'"),
        "{}",
        err.message()
    );
    let mut req = infer_request("tiny", "unused", 1, 2);
    req.inputs = vec![bytes_input("prompt", PNG_BYTES)];
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "input 'prompt' element 0 is not valid UTF-8 text"
        )
    );
    // Raw contents: the same answers.
    let raw_bytes = |items: &[&[u8]]| {
        let mut out = Vec::new();
        for item in items {
            out.extend_from_slice(&(item.len() as u32).to_le_bytes());
            out.extend_from_slice(item);
        }
        bytes::Bytes::from(out)
    };
    let mut req = infer_request("tiny", "a cat", 1, 2);
    req.inputs = vec![
        InferInputTensor {
            contents: None,
            ..prompt_input(&["a cat"])
        },
        InferInputTensor {
            contents: None,
            ..bytes_input("image", PNG_BYTES)
        },
    ];
    req.raw_input_contents = vec![raw_bytes(&[b"a cat"]), raw_bytes(&[PNG_BYTES])];
    let err = c.model_infer(req).await.unwrap_err();
    assert!(
        err.message()
            .starts_with("input 'image' element 0 cannot be decoded"),
        "{}",
        err.message()
    );
    let mut req = infer_request("tiny", "unused", 1, 2);
    req.inputs = vec![InferInputTensor {
        contents: None,
        ..prompt_input(&["x"])
    }];
    req.raw_input_contents = vec![raw_bytes(&[PNG_BYTES])];
    let err = c.model_infer(req).await.unwrap_err();
    assert_eq!(
        err.message(),
        "input 'prompt' element 0 is not valid UTF-8 text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_inference_and_repository() {
    let server = start(
        &["tiny"],
        Options {
            auth_token: Some("s3cret".into()),
            ..Default::default()
        },
    )
    .await;
    let mut c = server.client().await;
    let err = c
        .model_infer(infer_request("tiny", "a", 1, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        "health needs no token"
    );
    let mut req = Request::new(infer_request("tiny", "a", 1, 2));
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(
        c.model_infer(req).await.unwrap().into_inner().outputs.len(),
        1
    );
}

/// UNet passes the slow model has run so far.
fn steps_run(text: &str) -> f64 {
    metric_line(text, "sdserve_denoise_step_seconds_count{model=\"slow\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadline_is_deadline_exceeded_and_frees_the_worker() {
    // One worker: the second request can only run once the first has let go of it.
    let server = start(&["slow"], Options::default()).await;
    // tonic's own channel gives up at the deadline by itself (with CANCELLED); a plain HTTP/2
    // client leaves the deadline to the server, as this test needs.
    let mut c = server.plain_client();
    let mut req = Request::new(infer_request("slow", "a", 1, 150));
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = c.model_infer(req).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The server gives up a little before the client would (a tenth of 300 ms).
    assert!(
        err.message().starts_with("request deadline of 2"),
        "{}",
        err.message()
    );
    assert!(
        err.message().ends_with("ms exceeded while generating"),
        "{}",
        err.message()
    );
    assert!(took < Duration::from_secs(5), "answered after {took:?}");

    // 150 steps × 100 ms would hold the worker for 15 s if the first request went on.
    let started = Instant::now();
    let r = c
        .model_infer(infer_request("slow", "a", 2, 2))
        .await
        .unwrap()
        .into_inner();
    let next = started.elapsed();
    let text = server.metrics();
    eprintln!(
        "deadline answered after {took:?}; the next request took {next:?}; {} steps run",
        steps_run(&text)
    );
    assert_eq!(r.outputs.len(), 1);
    assert!(
        next < Duration::from_secs(10),
        "the next request waited {next:?}"
    );
    assert!(
        steps_run(&text) < 40.0,
        "the expired generation went on:\n{text}"
    );
    assert_eq!(
        metric_line(
            &text,
            "sdserve_request_failures_total{model=\"slow\",reason=\"deadline\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "grpc_server_handled_total{grpc_code=\"DEADLINE_EXCEEDED\",grpc_method=\"ModelInfer\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"UNARY\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancellation_stops_the_generation() {
    let server = start(&["slow"], Options::default()).await;
    let mut c = server.client().await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(400),
        c.model_infer(infer_request("slow", "a", 1, 150)),
    )
    .await;
    assert!(abandoned.is_err(), "the 15 s request cannot have finished");
    let started = Instant::now();
    let r = c
        .model_infer(infer_request("slow", "a", 2, 2))
        .await
        .unwrap()
        .into_inner();
    let next = started.elapsed();
    let text = server.metrics();
    eprintln!(
        "after a cancel, the next request took {next:?}; {} steps run",
        steps_run(&text)
    );
    assert_eq!(r.outputs.len(), 1);
    assert!(
        next < Duration::from_secs(10),
        "the next request waited {next:?}: the cancelled one kept the worker"
    );
    assert!(
        steps_run(&text) < 40.0,
        "the abandoned generation went on:\n{text}"
    );
    assert_eq!(
        metric_line(
            &text,
            "sdserve_request_failures_total{model=\"slow\",reason=\"disconnected\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "grpc_server_handled_total{grpc_code=\"CANCELLED\",grpc_method=\"ModelInfer\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"UNARY\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_infer_sends_progress_in_order_then_the_result() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // DDIM runs exactly num_inference_steps UNet passes (PNDM, the tiny model's default, one more).
    let mut first = infer_request("tiny", "a red circle", 7, 3);
    first.parameters.insert(
        "scheduler".into(),
        param(ParameterChoice::StringParam("ddim".into())),
    );
    tx.send(first).await.unwrap();
    let mut responses = c
        .model_stream_infer(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    let last = loop {
        let m = responses
            .message()
            .await
            .unwrap()
            .expect("a message before the end");
        assert_eq!(m.error_message, "");
        let r = m.infer_response.expect("infer_response");
        assert_eq!(r.id, "req-7");
        if r.outputs.is_empty() {
            assert_eq!(int_param(&r.parameters, "total"), 3);
            assert!(
                matches!(r.parameters["elapsed"].parameter_choice, Some(ParameterChoice::DoubleParam(e)) if e >= 0.0)
            );
            steps.push(int_param(&r.parameters, "step"));
        } else {
            break r;
        }
    };
    assert_eq!(steps, [1, 2, 3]);
    let png = &last.outputs[0].contents.as_ref().unwrap().bytes_contents[0];
    assert_eq!(decode_png(png).unwrap().0, 64);

    // A failing request is one error message; the stream goes on.
    tx.send(infer_request("nope", "a", 8, 2)).await.unwrap();
    let m = responses.message().await.unwrap().unwrap();
    assert_eq!(m.error_message, "Model nope not found");
    let r = m.infer_response.unwrap();
    assert_eq!(string_param(&r.parameters, "grpc_code"), "NOT_FOUND");
    assert_eq!(int_param(&r.parameters, "status_code"), 404);
    tx.send(infer_request("tiny", "a", 9, 1)).await.unwrap();
    let mut got_final = false;
    while let Some(m) = responses.message().await.unwrap() {
        let r = m.infer_response.unwrap();
        if !r.outputs.is_empty() {
            assert_eq!(r.id, "req-9");
            got_final = true;
            drop(tx);
            break;
        }
    }
    assert!(got_final);
    assert!(
        responses.message().await.unwrap().is_none(),
        "the stream ends once the client is done"
    );
    let text = server.metrics();
    assert_eq!(
        metric_line(
            &text,
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"ModelStreamInfer\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"BIDI_STREAM\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_success_total{model=\"tiny\",version=\"None\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_families_carry_mlserver_labels() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    c.server_ready(pb::ServerReadyRequest {}).await.unwrap();
    c.model_infer(infer_request("tiny", "a", 1, 1))
        .await
        .unwrap();
    let mut req = infer_request("tiny", "a", 1, 1);
    req.model_version = "v9".into();
    assert_eq!(c.model_infer(req).await.unwrap_err().code(), Code::NotFound);
    let text = server.metrics();
    let labels = |m: &str| {
        format!(
            "grpc_method=\"{m}\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"UNARY\""
        )
    };
    assert_eq!(
        metric_line(
            &text,
            &format!("grpc_server_started_total{{{}}}", labels("ModelInfer"))
        ),
        2.0
    );
    assert_eq!(
        metric_line(
            &text,
            &format!("grpc_server_started_total{{{}}}", labels("ServerReady"))
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            &format!(
                "grpc_server_handled_total{{grpc_code=\"OK\",{}}}",
                labels("ModelInfer")
            )
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            &format!(
                "grpc_server_handled_total{{grpc_code=\"NOT_FOUND\",{}}}",
                labels("ModelInfer")
            )
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            &format!(
                "grpc_server_handling_seconds_count{{{}}}",
                labels("ModelInfer")
            )
        ),
        2.0
    );
    for le in ["0.005", "0.075", "10.0", "+Inf"] {
        assert!(
            text.contains(&format!(
                "grpc_server_handling_seconds_bucket{{{},le=\"{le}\"}}",
                labels("ModelInfer")
            )),
            "bucket {le} missing in\n{text}"
        );
    }
    assert!(text.contains("# TYPE grpc_server_handling_seconds histogram\n"));
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_success_total{model=\"tiny\",version=\"None\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_failure_total{model=\"tiny\",version=\"v9\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &text,
            "model_infer_request_duration_count{model=\"tiny\",version=\"None\"}"
        ),
        1.0
    );
    assert_eq!(metric_line(&text, "parallel_request_queue_count"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_requests_with_unavailable() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    server.engine.begin_drain();
    let err = c
        .model_infer(infer_request("tiny", "a", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "server is shutting down and accepts no new requests"
    );
    assert!(
        !c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(pb::ModelReadyRequest {
            name: "tiny".into(),
            version: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_resource_exhausted() {
    let config = GrpcConfig {
        max_receive_message_bytes: 1024,
        ..GrpcConfig::default()
    };
    let server = start(
        &["tiny"],
        Options {
            config,
            ..Default::default()
        },
    )
    .await;
    let mut c = server.client().await;
    let long = "x".repeat(2000);
    let err = c
        .model_infer(infer_request("tiny", &long, 1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("limit of 1024 bytes (grpc_max_message_length)"),
        "{}",
        err.message()
    );
    let text = server.metrics();
    assert!(
        text.contains("grpc_code=\"RESOURCE_EXHAUSTED\",grpc_method=\"ModelInfer\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_calls_on_both_services() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let mut repo = ModelRepositoryServiceClient::new(server.channel().await);
    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, String)> = index
        .models
        .into_iter()
        .map(|m| (m.name, m.state))
        .collect();
    assert_eq!(
        states,
        [
            ("slow".into(), "UNAVAILABLE".into()),
            ("tiny".into(), "READY".into())
        ]
    );
    let ready_only = repo
        .repository_index(
            sdserve_grpc::pb::inference::model_repository::RepositoryIndexRequest {
                ready: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ready_only
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["tiny"]
    );

    repo.repository_model_unload(
        sdserve_grpc::pb::inference::model_repository::RepositoryModelUnloadRequest {
            model_name: "tiny".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = c
        .model_ready(pb::ModelReadyRequest {
            name: "tiny".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .repository_model_unload(pb::RepositoryModelUnloadRequest {
            model_name: "tiny".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "Model tiny not found")
    );

    c.repository_model_load(pb::RepositoryModelLoadRequest {
        model_name: "tiny".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        c.model_ready(pb::ModelReadyRequest {
            name: "tiny".into(),
            version: String::new()
        })
        .await
        .unwrap()
        .into_inner()
        .ready
    );
    let err = c
        .repository_model_load(pb::RepositoryModelLoadRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "Model nope not found")
    );
    let text = server.metrics();
    assert!(
        text.contains("grpc_server_started_total{grpc_method=\"RepositoryIndex\",grpc_service=\"inference.model_repository.ModelRepositoryService\",grpc_type=\"UNARY\"} 1.0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_and_closes_the_listener() {
    let mut server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ModelInferRequest>(1);
    let mut responses = c
        .model_stream_infer(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    server.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("the stream ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped after {:?}",
        started.elapsed()
    );
    drop(tx);
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect answered");
    assert!(refused.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_infer_sends_previews_when_asked() {
    let server = start(&["tiny"], Options::default()).await;
    let mut c = server.client().await;
    let with_preview = |mut req: pb::ModelInferRequest| {
        req.parameters.insert(
            "preview_every".into(),
            param(ParameterChoice::Int64Param(1)),
        );
        req.parameters.insert(
            "scheduler".into(),
            param(ParameterChoice::StringParam("ddim".into())),
        );
        req
    };

    // Unary calls cannot carry previews.
    let err = c
        .model_infer(with_preview(infer_request("tiny", "a", 1, 3)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("preview_every"), "{}", err.message());

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(with_preview(infer_request("tiny", "a red circle", 5, 3)))
        .await
        .unwrap();
    drop(tx);
    let mut responses = c
        .model_stream_infer(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(m) = responses.message().await.unwrap() {
        assert_eq!(m.error_message, "");
        let r = m.infer_response.unwrap();
        let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
        if names == ["image"] {
            break;
        }
        let step = int_param(&r.parameters, "step");
        if let Some(o) = r.outputs.first() {
            assert_eq!((o.name.as_str(), o.datatype.as_str()), ("preview", "BYTES"));
            assert_eq!(o.shape, [1, 1]);
            let png = &o.contents.as_ref().unwrap().bytes_contents[0];
            assert_eq!(decode_png(png).unwrap().0, 64);
        }
        seen.push((step, r.outputs.len()));
    }
    // A preview after every step but the last.
    assert_eq!(seen, [(1, 1), (2, 1), (3, 0)]);
}
