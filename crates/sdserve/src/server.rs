//! `sdserve start`: wires settings, engine, pipeline and HTTP together and runs the
//! lifecycle: listen → load models → serve → on SIGTERM/SIGINT drain → exit.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sdserve_engine::metrics::Registry;
use sdserve_engine::{Engine, EngineConfig, MemoryBudget, ModelSpec};
use sdserve_http::{AppState, HttpConfig, RestMetrics};
use sdserve_serving::{ServerInfo, Service};
use sdserve_settings::{
    Env, MemoryBudgetSetting, ModelSettings, ServerOverrides, ServerSettings, discover,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::loader::PipelineLoader;
use crate::repository::FsRepository;
use crate::spec::to_spec;

const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

pub async fn start(folder: &Path, overrides: ServerOverrides) -> anyhow::Result<()> {
    let env = Env::from_process();
    let loaded = discover(folder, &env, &overrides)?;
    crate::logging::init(&loaded.server);
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    for n in &loaded.notes {
        tracing::info!("{n}");
    }
    let server = &loaded.server;
    tracing::info!(settings = %server.to_json(), "starting sdserve {}", env!("CARGO_PKG_VERSION"));
    let specs = loaded
        .models
        .iter()
        .map(to_spec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;

    let registry = Arc::new(Registry::new());
    let engine = Engine::new(
        EngineConfig {
            parallel_workers: server.parallel_workers.max(1),
            max_queue_size: server.max_queue_size,
            request_timeout: server.request_timeout_duration(),
            memory_budget: match server.memory_budget {
                MemoryBudgetSetting::Auto => MemoryBudget::Auto,
                MemoryBudgetSetting::Off => MemoryBudget::Off,
                MemoryBudgetSetting::Bytes(b) => MemoryBudget::Bytes(b),
            },
        },
        Arc::new(PipelineLoader),
        &registry,
    );
    match engine.memory("cpu").capacity {
        Some(bytes) => tracing::info!(
            budget = %sdserve_engine::memory::human(bytes),
            setting = %server.memory_budget,
            "memory budget on cpu"
        ),
        None => tracing::info!(setting = %server.memory_budget, "no memory budget on cpu"),
    }
    let service = Arc::new(Service {
        engine: engine.clone(),
        info: server_info(server),
        repository: Arc::new(FsRepository {
            root: server.model_repository_root.clone(),
            env,
        }),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = spawn_listeners(server, &registry, service, stop_rx).await?;

    // Models load while the servers already answer: live is 200, ready is 400 until done.
    let signal = tokio::spawn(shutdown_signal());
    match load_models(&engine, specs, &loaded.models, &signal).await {
        Loading::Failed(reason) => {
            // The engine has logged the failure (model, stage, cause); this is the exit reason.
            let _ = stop_tx.send(true);
            engine.shutdown();
            join(tasks).await;
            bail!("Some of the models failed to load during startup! {reason}");
        }
        Loading::Done => {
            let _ = signal.await;
        }
        Loading::Interrupted => {}
    }
    tracing::info!(
        "shutdown signal received: no longer ready, draining for up to {:.0} s",
        server.drain_timeout_duration().as_secs_f64()
    );
    if !engine.drain(server.drain_timeout_duration()).await {
        tracing::warn!("drain timeout reached; requests still running were cancelled");
    }
    let _ = stop_tx.send(true);
    join(tasks).await;
    engine.shutdown();
    tracing::info!("sdserve stopped");
    Ok(())
}

/// The REST, gRPC and (when enabled) metrics listeners, each serving until `stop` turns true.
async fn spawn_listeners(
    server: &ServerSettings,
    registry: &Arc<Registry>,
    service: Arc<Service>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let metrics = server.metrics_enabled();
    let rest_metrics = metrics.then(|| {
        Arc::new(RestMetrics::register(
            registry,
            &server.metrics_rest_server_prefix,
        ))
    });
    let state = Arc::new(AppState {
        service: service.clone(),
        config: http_config(server),
    });
    let mut tasks = Vec::new();
    let http_listener = bind(&server.host, server.http_port, "HTTP").await?;
    tracing::info!(
        "HTTP server running on http://{}",
        http_listener.local_addr()?
    );
    let limits = connection_limits(server);
    tasks.push(tokio::spawn(sdserve_http::serve(
        http_listener,
        sdserve_http::router(state, rest_metrics),
        limits,
        stopped(stop.clone()),
    )));
    let grpc_listener = bind(&server.host, server.grpc_port, "gRPC").await?;
    tracing::info!(
        "gRPC server running on http://{}",
        grpc_listener.local_addr()?
    );
    let grpc_metrics = metrics.then(|| Arc::new(sdserve_grpc::GrpcMetrics::register(registry)));
    tasks.push(tokio::spawn(sdserve_grpc::serve(
        grpc_listener,
        service,
        sdserve_grpc::GrpcConfig {
            connections: connection_limits(server),
            ..sdserve_grpc::GrpcConfig::from_settings(server.grpc_max_message_length)
        },
        grpc_metrics,
        stopped(stop.clone()),
    )));
    if let Some(endpoint) = &server.metrics_endpoint {
        let listener = bind(&server.host, server.metrics_port, "metrics").await?;
        let addr = listener.local_addr()?;
        tracing::info!("Metrics server running on http://{addr}");
        tracing::info!("Prometheus scraping endpoint can be accessed on http://{addr}{endpoint}");
        tasks.push(tokio::spawn(sdserve_http::serve(
            listener,
            sdserve_http::metrics_router(registry.clone(), endpoint),
            limits,
            stopped(stop),
        )));
    }
    Ok(tasks)
}

/// The HTTP and metrics listeners' connection bounds.
fn connection_limits(server: &ServerSettings) -> sdserve_http::ConnectionLimits {
    sdserve_http::ConnectionLimits {
        header_read_timeout: Duration::from_secs_f64(server.header_read_timeout),
        keep_alive_timeout: Duration::from_secs_f64(server.keep_alive_timeout),
        max_connections: server.max_connections,
    }
}

async fn join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// How loading the configured models ended.
enum Loading {
    Done,
    /// A shutdown signal came first: the server stops as it would while serving.
    Interrupted,
    /// This model failed (the reason names its settings file and uri).
    Failed(String),
}

/// Loads the models one after the other, unless a shutdown signal comes first.
async fn load_models(
    engine: &Engine,
    specs: Vec<ModelSpec>,
    settings: &[ModelSettings],
    signal: &JoinHandle<()>,
) -> Loading {
    for spec in specs {
        let name = spec.name.clone();
        let uri = spec.uri.clone();
        let started = Instant::now();
        tracing::info!("loading model {name} from {}", uri.display());
        let load = engine.load(spec);
        tokio::pin!(load);
        tokio::select! {
            r = &mut load => match r {
                Ok(()) => tracing::info!("Loaded model {name} successfully in {:.2} s", started.elapsed().as_secs_f64()),
                Err(e) => {
                    let file = settings.iter().find(|m| m.name == name).and_then(|m| m.settings_file.clone());
                    let origin = file.map(|f| f.display().to_string()).unwrap_or_else(|| "MLSERVER_MODEL_* variables".into());
                    return Loading::Failed(format!("model {name} ({origin}, uri {}) failed to load: {e}", uri.display()));
                }
            },
            _ = signal_finished(signal) => {
                tracing::info!("shutdown signal received while loading model {name}; not waiting for it");
                return Loading::Interrupted;
            }
        }
    }
    Loading::Done
}

async fn signal_finished(signal: &JoinHandle<()>) {
    while !signal.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn server_info(s: &ServerSettings) -> ServerInfo {
    ServerInfo {
        server_name: s.server_name.clone(),
        server_version: s.server_version.clone(),
        extensions: s.extensions.clone(),
        auth_token: s.auth_token.clone(),
        namespace: std::fs::read_to_string(NAMESPACE_FILE)
            .ok()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty()),
    }
}

fn http_config(s: &ServerSettings) -> HttpConfig {
    HttpConfig {
        max_request_body_bytes: usize::try_from(s.max_request_body_bytes).unwrap_or(usize::MAX),
        gzip_enabled: s.gzip_enabled,
        cors: s.cors_settings.clone(),
    }
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve host {host:?} for the {what} server"))?
        .next()
        .with_context(|| format!("host {host:?} resolves to no address"))?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what} server"))
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
