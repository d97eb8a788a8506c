//! Liveness, version and metrics: what load balancers and Prometheus poll.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;

/// 200 once the engine is up, 503 while the model loads.
#[utoipa::path(get, path = "/health", responses((status = 200), (status = 503, body = super::error::ErrorResponse)))]
pub async fn health(State(st): State<AppState>) -> Result<StatusCode, ApiError> {
    let ready = st.ready()?;
    if !ready.engine.is_alive() {
        return Err(ApiError::unavailable("the engine has stopped"));
    }
    Ok(StatusCode::OK)
}

#[derive(Serialize, ToSchema)]
pub struct Version {
    pub version: &'static str,
}

#[utoipa::path(get, path = "/version", responses((status = 200, body = Version)))]
pub async fn version() -> Json<Version> {
    Json(Version { version: env!("CARGO_PKG_VERSION") })
}

/// Prometheus text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain"), (status = 503)))]
pub async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let ready = st.ready()?;
    let mut f = crate::metrics::Families::default();
    ready.engine.metrics().collect(&mut f);
    ready.loras.collect_metrics(&mut f);
    st.routes.collect_metrics(&mut f);
    st.responses.collect(&mut f);
    f.gauge(
        "tandem_engine_alive",
        "1 while the engine thread runs; 0 once it has died (/health answers 503).",
        if ready.engine.is_alive() { 1.0 } else { 0.0 },
    );
    let w = &ready.weights;
    f.labelled(
        "tandem_model_info",
        "The served base model: how its weights are stored.",
        false,
        [(vec![("quantization", w.quantization.as_str())], 1.0)],
    );
    f.gauge("tandem_model_weight_bytes", "Bytes of the base model's weights as stored.", w.bytes as f64);
    let text = crate::metrics::expose(f).map_err(|e| ApiError::internal(format!("rendering metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// Unknown routes get the error envelope too.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// The client side of `/health`, for container health checks (`tandem
/// health`): the status a server at `host:port` answers, over plain HTTP/1.0
/// so an image needs no curl. A server bound to every address is asked on
/// the loopback.
pub fn probe(host: &str, port: u16, timeout: std::time::Duration) -> Result<u16, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "::1",
        h => h,
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port}: no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout))).map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP answer: {line:?}"))
}
