//! One inference call, whatever its transport: admit (before the body is read), decode the
//! contract and validate against the model, then run.
//!
//! A transport calls [`Service::admit`], reads and decodes its own message into an
//! [`InferenceRequest`] (reporting its own failures through [`Pending::fail`]), then
//! [`Pending::accept`]s it and [`Accepted::run`]s it. Every step counts the request in the
//! model metrics exactly once, and every server-side failure is logged once.

use std::time::Duration;

use sdserve_engine::{Admission, Engine, InferObserver, Prepared, Progress};
use sdserve_generation::Job;
use sdserve_protocol::{Decoded, InferenceRequest, diffusers};
use tokio::sync::mpsc;

use crate::error::{ErrorKind, ServeError};
use crate::response::Generated;
use crate::service::Service;

/// How the request came: streaming calls may ask for previews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A unary call; `streaming_route` says where `preview_every` would be accepted.
    Unary {
        streaming_route: &'static str,
    },
    Streaming,
}

/// An admitted request whose message is not decoded yet.
pub struct Pending {
    model: String,
    version: Option<String>,
    admission: Admission,
    observer: InferObserver,
    engine: Engine,
}

/// A slot taken before the request says which model it is for: OpenAI's bodies name the model
/// inside, and the slot must be held before a body is read, as on the V2 routes.
pub struct Slot {
    admission: Admission,
    engine: Engine,
}

/// A request that passed admission and validation, ready to queue.
pub struct Accepted {
    /// The request's `id`, or a fresh UUID.
    pub id: String,
    pub model: String,
    prepared: Prepared,
    observer: InferObserver,
    engine: Engine,
}

/// A fresh request id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Service {
    /// Takes a slot for a request to `model` (`version`: the one named in the call), before
    /// its message is read.
    pub fn admit(&self, model: &str, version: Option<&str>) -> Result<Pending, ServeError> {
        match self.engine.admit() {
            Ok(admission) => Ok(Pending::new(admission, self.engine.clone(), model, version)),
            Err(e) => {
                let observer = self.engine.observer(model, version.unwrap_or("None"));
                observer.finish(Err(&e));
                let e = ServeError::from(e);
                e.log("-", model);
                Err(e)
            }
        }
    }

    /// Takes a slot for a request whose model is not known yet. A refusal is counted for the
    /// only model loaded, when there is one (a pod's usual case); else by the transport's
    /// metrics only.
    pub fn admit_unnamed(&self) -> Result<Slot, ServeError> {
        match self.engine.admit() {
            Ok(admission) => Ok(Slot {
                admission,
                engine: self.engine.clone(),
            }),
            Err(e) => {
                if let [only] = self.ready_models().as_slice() {
                    self.engine.observer(&only.name, "None").finish(Err(&e));
                }
                let e = ServeError::from(e);
                e.log("-", "-");
                Err(e)
            }
        }
    }
}

impl Slot {
    /// The request turned out to be for `model`: from here on it is counted for it.
    pub fn for_model(self, model: &str) -> Pending {
        Pending::new(self.admission, self.engine, model, None)
    }
}

impl Pending {
    /// A request to `model` (`version`: the one named in the call) holding `admission`.
    fn new(admission: Admission, engine: Engine, model: &str, version: Option<&str>) -> Self {
        Pending {
            model: model.to_owned(),
            version: version.map(str::to_owned),
            observer: engine.observer(model, version.unwrap_or("None")),
            admission,
            engine,
        }
    }

    /// The transport could not read the request: counted as a failure and handed back.
    pub fn fail(self, e: ServeError) -> ServeError {
        e.log("-", &self.model);
        self.reject(e.kind);
        e
    }

    /// As [`Pending::fail`], for a transport that answers with its own error value.
    pub fn reject(self, kind: ErrorKind) {
        self.observer.fail(kind.reason());
    }

    /// Decodes the contract and validates the request against the model. `deadline`: the
    /// transport's own (a gRPC deadline); the shorter of it and `parameters.timeout` counts.
    pub fn accept(
        self,
        request: InferenceRequest,
        mode: Mode,
        deadline: Option<Duration>,
    ) -> Result<Accepted, ServeError> {
        match diffusers::decode(&request) {
            Ok(decoded) => self.accept_decoded(decoded, request.id, mode, deadline),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// As [`Pending::accept`], for a request another contract decoded (OpenAI's Images API).
    /// `id`: the client's, or `None` for a fresh one.
    pub fn accept_decoded(
        self,
        decoded: Decoded,
        id: Option<String>,
        mode: Mode,
        deadline: Option<Duration>,
    ) -> Result<Accepted, ServeError> {
        let preview_every = decoded.options.preview_every;
        if let (Mode::Unary { streaming_route }, Some(_)) = (mode, preview_every) {
            return Err(self.fail(ServeError::invalid(format!(
                "parameter 'preview_every' needs {streaming_route}"
            ))));
        }
        let timeout = match (decoded.options.timeout, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Pending {
            model,
            version,
            admission,
            observer,
            engine,
        } = self;
        let prepared = engine
            .prepare(
                admission,
                &model,
                version.as_deref(),
                &decoded.generation,
                timeout,
            )
            .and_then(|p| p.with_preview_every(preview_every));
        let id = id.unwrap_or_else(new_id);
        match prepared {
            Ok(prepared) => Ok(Accepted {
                id,
                model,
                prepared,
                observer,
                engine,
            }),
            Err(e) => {
                observer.finish(Err(&e));
                let e = ServeError::from(e);
                e.log(&id, &model);
                Err(e)
            }
        }
    }
}

impl Accepted {
    /// The effective settings (defaults filled in).
    pub fn job(&self) -> &Job {
        self.prepared.job()
    }

    /// Queues the request and awaits its images; with `progress`, one event per scheduler
    /// step goes there meanwhile. Dropping the future cancels the generation (and counts the
    /// request as abandoned by its client).
    pub async fn run(
        self,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<Generated, ServeError> {
        let Accepted {
            id,
            model,
            prepared,
            mut observer,
            engine,
        } = self;
        let result = engine.run(prepared, &mut observer, progress).await;
        observer.finish(result.as_ref().map(|o| o.images.len()));
        match result {
            Ok(outcome) => Ok(Generated { id, model, outcome }),
            Err(e) => {
                let e = ServeError::from(e);
                e.log(&id, &model);
                Err(e)
            }
        }
    }
}
