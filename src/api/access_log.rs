//! The outermost layer: a request id (the client's `x-request-id` when it
//! sends a sane one, else a new one) on a tracing span around the request and
//! in the response's `x-request-id`, and one access line per request when its
//! body ends (or its client goes away): method, path, status, the model and
//! route target that served it, the API key's name, tokens and latency.
//! Never prompts, outputs or keys. Liveness and metrics polls log at debug.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tracing::Instrument;

/// Tokens a request's choices used, added as each choice ends.
#[derive(Debug, Default)]
pub struct TokenTally {
    pub prompt: AtomicU64,
    pub completion: AtomicU64,
}

/// The request's tally (a request extension handlers pass to their choices).
#[derive(Debug, Clone)]
pub struct Tally(pub Arc<TokenTally>);

impl PartialEq for Tally {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Tally {
    pub fn add(&self, prompt: usize, completion: usize) {
        self.0.prompt.fetch_add(prompt as u64, Ordering::Relaxed);
        self.0.completion.fetch_add(completion as u64, Ordering::Relaxed);
    }
}

/// What served a request (a response extension set by the generation handlers).
#[derive(Debug, Clone)]
pub struct Served {
    pub model: String,
    /// (alias, target) when `model` was a route's alias.
    pub route: Option<(String, String)>,
}

/// The API key's name (a response extension set by the auth layer).
#[derive(Debug, Clone)]
pub struct KeyName(pub String);

const QUIET: &[&str] = &["/health", "/metrics", "/version"];

fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| crate::store::new_id("req-"))
}

/// Responses by route template (`/v1/files/{file_id}`, never the raw path:
/// bounded cardinality; `unmatched` for unknown paths), method and status:
/// `tandem_http_responses_total`, what error-rate alerts read.
#[derive(Default)]
pub struct ResponseCounts(std::sync::Mutex<std::collections::BTreeMap<(String, String, u16), u64>>);

impl ResponseCounts {
    fn count(&self, path: &str, method: &str, status: u16) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((path.to_string(), method.to_string(), status)).or_default() += 1;
    }

    pub fn collect(&self, f: &mut crate::metrics::Families) {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let statuses: Vec<String> = m.keys().map(|(_, _, s)| s.to_string()).collect();
        f.labelled(
            "tandem_http_responses_total",
            "HTTP responses by route template, method and status.",
            true,
            m.iter().zip(&statuses).map(|(((path, method, _), n), status)| {
                (vec![("path", path.as_str()), ("method", method.as_str()), ("status", status.as_str())], *n as f64)
            }),
        );
    }
}

pub async fn layer(State(st): State<super::AppState>, mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let template = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let tally = Tally(Arc::new(TokenTally::default()));
    req.extensions_mut().insert(tally.clone());
    let span = tracing::info_span!("request", request_id = %id);
    let start = Instant::now();
    let mut response = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    st.responses.count(&template, &method, response.status().as_u16());
    let mut line = AccessLine {
        state: st,
        first_byte: None,
        id,
        method,
        status: response.status().as_u16(),
        served: response.extensions().get::<Served>().cloned(),
        key: response.extensions().get::<KeyName>().map(|k| k.0.clone()),
        quiet: QUIET.contains(&path.as_str()),
        path,
        tally,
        start,
    };
    let (parts, body) = response.into_parts();
    // The line is written (and routed responses timed) when the stream is dropped.
    let stream = body.into_data_stream().map(move |chunk| {
        // Through the whole `line`: a closure naming only the (Copy) field
        // would capture a copy of it and leave `line` to drop right here.
        let line = &mut line;
        line.first_byte.get_or_insert_with(Instant::now);
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

struct AccessLine {
    state: super::AppState,
    first_byte: Option<Instant>,
    id: String,
    method: String,
    path: String,
    status: u16,
    served: Option<Served>,
    key: Option<String>,
    quiet: bool,
    tally: Tally,
    start: Instant,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let latency_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let model = self.served.as_ref().map_or("", |s| s.model.as_str());
        let target = self.served.as_ref().and_then(|s| s.route.as_ref()).map_or("", |(_, t)| t.as_str());
        let key = self.key.as_deref().unwrap_or("");
        let (prompt, completion) =
            (self.tally.0.prompt.load(Ordering::Relaxed), self.tally.0.completion.load(Ordering::Relaxed));
        if let Some((alias, t)) = self.served.as_ref().and_then(|s| s.route.as_ref()) {
            let first = self.first_byte.map(|f| f.duration_since(self.start).as_secs_f64());
            let failed = !(200..300).contains(&self.status);
            self.state.routes.observe(alias, t, first, latency_ms / 1e3, completion, failed);
        }
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "tandem::access",
                    request_id = %self.id,
                    method = %self.method,
                    path = %self.path,
                    status = self.status,
                    model,
                    route_target = target,
                    key,
                    prompt_tokens = prompt,
                    completion_tokens = completion,
                    latency_ms = format_args!("{latency_ms:.1}"),
                    "{} {} {}",
                    self.method,
                    self.path,
                    self.status
                )
            };
        }
        if self.quiet {
            line!(debug);
        } else {
            line!(info);
        }
    }
}
