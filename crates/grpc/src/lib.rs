//! The gRPC face of sdserve: MLServer 1.7.1's `inference.GRPCInferenceService` and
//! `inference.model_repository.ModelRepositoryService` on the gRPC port, over the same
//! transport-neutral service as REST (`sdserve_serving`): engine, queue, contract decoder,
//! errors and model metrics. The only crate that imports tonic; it knows nothing of axum.
//!
//! # Layout
//! - [`pb`]: message types, servers and clients generated from `proto/` at build time.
//! - [`convert`]: gRPC messages ⇄ the typed V2 request and the answer.
//! - [`service`]: the data plane service.
//! - [`repository`]: the repository calls and the separate repository service.
//! - [`status`]: failures → gRPC codes, deadlines, bearer tokens.
//! - [`metrics`]: the `grpc_server_*` families and the per-call wrapper.
//! - [`server`]: settings and the listener.
//!
//! Deliberate differences from MLServer: `ModelStreamInfer` answers with Triton's
//! `ModelStreamInferResponse` (an `error_message` per failed request, the stream goes on)
//! rather than bare `ModelInferResponse`s; images are PNG bytes (not base64) because gRPC
//! carries bytes; errors of every call are mapped (MLServer leaves some as UNKNOWN).

#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod inference {
        tonic::include_proto!("inference");

        pub mod model_repository {
            tonic::include_proto!("inference.model_repository");
        }
    }
}

pub mod convert;
pub mod metrics;
pub mod repository;
pub mod server;
pub mod service;
pub mod status;

pub use metrics::{GrpcMetrics, TrailingMetadata};
pub use repository::Repository;
pub use server::{DEFAULT_MAX_RECEIVE_BYTES, GrpcConfig, routes, serve};
pub use service::Dataplane;
