//! OpenAPI documents: the generic V2 data plane, and one per model that spells out the
//! diffusers inputs and outputs this server really accepts.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Html;
use sdserve_protocol::diffusers::{ModelDescription, input_metadata, input_names, parameter_names};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::SharedState;

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
}

fn components(request_schema: Value) -> Value {
    let datatypes: Vec<&str> = sdserve_protocol::Datatype::ALL
        .iter()
        .map(|d| d.as_str())
        .collect();
    json!({"schemas": {
        "Datatype": {"type": "string", "enum": datatypes},
        "Parameters": {"type": "object", "additionalProperties": true},
        "TensorData": {"oneOf": [{"type": "array", "items": {}}, {"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
        "RequestInput": {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"$ref": "#/components/schemas/Datatype"}, "parameters": {"$ref": "#/components/schemas/Parameters"},
            "data": {"$ref": "#/components/schemas/TensorData"}}},
        "RequestOutput": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/Parameters"}}},
        "InferenceRequest": request_schema,
        "ResponseOutput": {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"$ref": "#/components/schemas/Datatype"}, "parameters": {"$ref": "#/components/schemas/Parameters"},
            "data": {"$ref": "#/components/schemas/TensorData"}}},
        "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}}}},
        "MetadataServerResponse": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array", "items": {"type": "string"}}}},
        "MetadataTensor": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"$ref": "#/components/schemas/Datatype"},
            "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"$ref": "#/components/schemas/Parameters"}}},
        "MetadataModelResponse": {"type": "object", "required": ["name", "platform"], "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}}, "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/MetadataTensor"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/MetadataTensor"}},
            "parameters": {"$ref": "#/components/schemas/Parameters"}}},
        "RepositoryIndexRequest": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "RepositoryIndexResponse": {"type": "array", "items": {"type": "object", "required": ["name", "state", "reason"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "state": {"type": "string", "enum": ["UNKNOWN", "READY", "UNAVAILABLE", "LOADING", "UNLOADING"]},
            "reason": {"type": "string"}}}},
        "ErrorResponse": {"type": "object", "properties": {"error": {"type": "string"}}}
    }})
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn ok_json(schema: &str) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn model_paths(base: &str, params: &Value) -> Vec<(String, Value)> {
    // Triton's binary tensor data extension: a JSON header, then the tensors' bytes.
    let mut infer_params = params.as_array().cloned().unwrap_or_default();
    infer_params.push(json!({"name": "Inference-Header-Content-Length", "in": "header", "required": false,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Binary tensor data extension: length of the JSON header at the start of the body, followed by the \
                        bytes of every input with parameters.binary_data_size, in input order; 0: the whole body is the prompt"}));
    let raw = json!({"schema": {"type": "string", "format": "binary"}});
    let mut request_body = json_body("InferenceRequest");
    request_body["content"]["application/octet-stream"] = raw.clone();
    let mut ok = ok_json("InferenceResponse");
    ok["content"]["application/octet-stream"] = raw;
    ok["description"] = json!(
        "OK. With outputs[].parameters.binary_data or parameters.binary_data_output: the JSON header \
                               (Inference-Header-Content-Length bytes), then each PNG as a 4-byte little-endian length and the file"
    );
    let infer = json!({"post": {"summary": "Generate images", "parameters": infer_params, "requestBody": request_body,
        "responses": {"200": ok, "400": error_response("Invalid request or model not ready"),
                      "404": error_response("Unknown model or version"), "422": error_response("Body is not a V2 request"),
                      "503": error_response("Queue full or server draining (Retry-After)"), "504": error_response("Request deadline exceeded"),
                      "500": error_response("Generation failed")}}});
    let stream = json!({"post": {"summary": "Generate images, streaming progress (server-sent events)", "parameters": params,
        "requestBody": json_body("InferenceRequest"),
        "responses": {"200": {"description": "text/event-stream: one progress event per denoising step, then the InferenceResponse",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}}}});
    vec![
        (
            base.to_owned(),
            json!({"get": {"summary": "Model metadata", "parameters": params,
            "responses": {"200": ok_json("MetadataModelResponse"), "404": error_response("Unknown model")}}}),
        ),
        (
            format!("{base}/ready"),
            json!({"get": {"summary": "Model ready (200) or not (400), empty body", "parameters": params,
            "responses": {"200": {"description": "Ready"}, "400": {"description": "Not ready"}, "404": error_response("Unknown model")}}}),
        ),
        (format!("{base}/infer"), infer.clone()),
        (format!("{base}/generate"), infer),
        (format!("{base}/infer_stream"), stream.clone()),
        (format!("{base}/generate_stream"), stream),
    ]
}

/// The generic V2 data plane ("Data Plane").
pub fn dataplane() -> Value {
    let name =
        json!({"name": "model_name", "in": "path", "required": true, "schema": {"type": "string"}});
    let version = json!({"name": "model_version", "in": "path", "required": true, "schema": {"type": "string"}});
    let mut paths = serde_json::Map::new();
    paths.insert("/v2".into(), json!({"get": {"summary": "Server metadata", "responses": {"200": ok_json("MetadataServerResponse")}}}));
    paths.insert("/v2/health/live".into(), json!({"get": {"summary": "Server live: 200, empty body", "responses": {"200": {"description": "Live"}}}}));
    paths.insert("/v2/health/ready".into(), json!({"get": {"summary": "Server ready: 200, or 400 while models load or the server drains",
        "responses": {"200": {"description": "Ready"}, "400": {"description": "Not ready"}}}}));
    for (p, v) in model_paths("/v2/models/{model_name}", &json!([name])) {
        paths.insert(p, v);
    }
    for (p, v) in model_paths(
        "/v2/models/{model_name}/versions/{model_version}",
        &json!([name, version]),
    ) {
        paths.insert(p, v);
    }
    paths.insert("/v2/repository/index".into(), json!({"post": {"summary": "Models on disk and their state",
        "requestBody": json_body("RepositoryIndexRequest"), "responses": {"200": ok_json("RepositoryIndexResponse")}}}));
    paths.insert("/v2/repository/models/{model_name}/load".into(), json!({"post": {"summary": "Load or reload a model",
        "parameters": [name], "responses": {"200": {"description": "Loaded"}, "404": error_response("Unknown model")}}}));
    paths.insert("/v2/repository/models/{model_name}/unload".into(), json!({"post": {"summary": "Unload a model",
        "parameters": [name], "responses": {"200": {"description": "Unloaded"}, "404": error_response("Unknown model")}}}));
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Data Plane", "version": env!("CARGO_PKG_VERSION"),
                 "description": "V2 / Open Inference Protocol data plane, as served by sdserve"},
        "paths": paths,
        "components": components(json!({"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/Parameters"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}}}}))
    })
}

/// One model's data plane, with its real inputs, parameters and output.
pub fn model_dataplane(
    model: &str,
    version: Option<&str>,
    description: Option<&ModelDescription>,
) -> Value {
    let schedulers = description
        .map(|d| d.schedulers.clone())
        .unwrap_or_default();
    let inputs: Vec<Value> = input_metadata(description)
        .into_iter()
        .map(|t| {
            json!({"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
                "name": {"type": "string", "enum": [t.name]},
                "datatype": {"type": "string", "enum": [t.datatype.as_str()]},
                "shape": {"type": "array", "items": {"type": "integer"}, "description": format!("{:?} (-1: any)", t.shape)},
                "parameters": {"$ref": "#/components/schemas/Parameters"},
                "data": {"$ref": "#/components/schemas/TensorData"}}})
        })
        .collect();
    let mut parameter_props = serde_json::Map::new();
    for p in parameter_names() {
        let schema = match p {
            "negative_prompt" | "prompt_2" | "negative_prompt_2" | "output_format" => {
                json!({"type": "string"})
            }
            "original_size"
            | "crops_coords_top_left"
            | "target_size"
            | "negative_original_size"
            | "negative_crops_coords_top_left"
            | "negative_target_size" => json!({"type": "array", "items": {"type": "integer"},
                "minItems": 2, "maxItems": 2, "description": "SDXL models only"}),
            "scheduler" => json!({"type": "string", "enum": schedulers}),
            "guidance_scale" | "eta" => json!({"type": "number"}),
            "aesthetic_score" | "negative_aesthetic_score" => {
                json!({"type": "number", "description": "SDXL refiners only"})
            }
            "strength" => json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                "description": "image-to-image only: how far to depart from the input image"}),
            "timeout" => json!({"type": "number", "description": "deadline in milliseconds"}),
            "preview_every" => json!({"type": "integer", "minimum": 1,
                "description": "stream routes only: a preview image every k steps"}),
            "seed" => {
                json!({"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]})
            }
            _ => json!({"type": "integer"}),
        };
        parameter_props.insert((*p).to_owned(), schema);
    }
    let request = json!({"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": parameter_props, "additionalProperties": true},
        "inputs": {"type": "array", "items": {"oneOf": inputs}, "description": format!("allowed names: {}", input_names().join(", "))},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "enum": ["image"]}}}}}});
    let base = match version {
        Some(v) => format!("/v2/models/{model}/versions/{v}"),
        None => format!("/v2/models/{model}"),
    };
    let paths: serde_json::Map<String, Value> =
        model_paths(&base, &json!([])).into_iter().collect();
    json!({
        "openapi": "3.0.3",
        "info": {"title": format!("Data Plane for Model {model}"), "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": components(request)
    })
}

pub async fn openapi() -> Json<Value> {
    Json(dataplane())
}

pub async fn model_openapi(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    model_doc(&state, &name, None)
}

pub async fn model_version_openapi(
    State(state): State<SharedState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    model_doc(&state, &name, Some(&version))
}

fn model_doc(
    state: &SharedState,
    name: &str,
    version: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let status = state.service.engine.model(name, version)?;
    let description = match &status {
        sdserve_engine::ModelStatus::Ready(m) => Some(m.description()),
        sdserve_engine::ModelStatus::Loading(_) => None,
    };
    Ok(Json(model_dataplane(name, version, description)))
}

fn swagger(title: &str, spec_url: &str) -> Html<String> {
    Html(format!(
        r##"<!DOCTYPE html>
<html><head><title>{title}</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{spec_url}", dom_id: "#swagger-ui"}});</script>
</body></html>"##
    ))
}

pub async fn docs() -> Html<String> {
    swagger("Data Plane", "/v2/docs/dataplane.json")
}

pub async fn model_docs(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Html<String>, ApiError> {
    state.service.engine.model(&name, None)?;
    Ok(swagger(
        &format!("Data Plane for Model {name}"),
        &format!("/v2/models/{name}/docs/dataplane.json"),
    ))
}

pub async fn model_version_docs(
    State(state): State<SharedState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Html<String>, ApiError> {
    state.service.engine.model(&name, Some(&version))?;
    Ok(swagger(
        &format!("Data Plane for Model {name}"),
        &format!("/v2/models/{name}/versions/{version}/docs/dataplane.json"),
    ))
}
