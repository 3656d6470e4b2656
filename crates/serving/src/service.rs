//! What both transports serve from: the engine, the server's identity and token, and the
//! model repository on disk.

use std::sync::Arc;

use sdserve_engine::Engine;

use crate::error::ServeError;
use crate::repository::ModelRepository;

/// Server-level settings every transport reports or enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// `server_name`, reported by server metadata and in CloudEvents headers ("mlserver" by
    /// default).
    pub server_name: String,
    pub server_version: String,
    /// `extensions` as configured (REST adds the ones it implements).
    pub extensions: Vec<String>,
    /// When set, inference and repository calls need `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Kubernetes namespace, when running in a pod (CloudEvents `ce-namespace`).
    pub namespace: Option<String>,
}

pub struct Service {
    pub engine: Engine,
    pub info: ServerInfo,
    pub repository: Arc<dyn ModelRepository>,
}

impl Service {
    /// The bearer-token check of inference and repository calls, on an `authorization` value
    /// (a REST header or gRPC metadata); anything passes when no token is configured.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), ServeError> {
        if authorized(self.info.auth_token.as_deref(), authorization) {
            Ok(())
        } else {
            Err(ServeError::unauthenticated())
        }
    }
}

/// Whether `authorization` carries the bearer `token` (always, when there is none).
pub fn authorized(token: Option<&str>, authorization: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = authorization.and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(authorized(None, None));
        assert!(!authorized(Some("s3cret"), None));
        assert!(authorized(Some("s3cret"), Some("Bearer s3cret")));
        assert!(authorized(Some("s3cret"), Some("bearer s3cret ")));
        assert!(!authorized(Some("s3cret"), Some("Bearer other")));
        assert!(!authorized(Some("s3cret"), Some("s3cret")));
    }
}
