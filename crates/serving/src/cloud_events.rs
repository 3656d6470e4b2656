//! MLServer's CloudEvents headers on every infer response: HTTP headers over REST (inside
//! `parameters.headers` in streams), trailing metadata over gRPC.

use crate::service::ServerInfo;

/// `(name, value)` of each header, for `model` and request `id`.
pub fn cloud_events(info: &ServerInfo, model: &str, id: &str) -> Vec<(&'static str, String)> {
    let server = &info.server_name;
    let source = match &info.namespace {
        Some(ns) => format!("io.seldon.serving.deployment.{server}.{ns}"),
        None => format!("io.seldon.serving.deployment.{server}"),
    };
    let mut headers = vec![
        ("ce-specversion", "0.3".to_owned()),
        ("ce-source", source),
        ("ce-type", "io.seldon.serving.inference.response".to_owned()),
        ("ce-modelid", model.to_owned()),
        ("ce-inferenceservicename", server.clone()),
        ("ce-endpoint", model.to_owned()),
        ("ce-id", id.to_owned()),
        ("ce-requestid", id.to_owned()),
    ];
    if let Some(ns) = &info.namespace {
        headers.push(("ce-namespace", ns.clone()));
    }
    headers
}
