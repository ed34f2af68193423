//! `/metrics` (Prometheus text format) and `/health` (JSON) on a local TCP address.

use crate::server::{ServerError, View};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub(crate) async fn serve(
    addr: SocketAddr,
    view: Arc<View>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Metrics { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Metrics { addr, source })?;
    if !local.ip().is_loopback() {
        tracing::warn!(%local, "metrics and health are served on a non-loopback address; firewall it");
    }
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let view = view.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let view = view.clone();
                    async move { Ok::<_, Infallible>(route(&view, req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(tcp), svc);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            });
        }
    });
    tracing::info!(%local, "metrics on http://{local}/metrics, health on /health");
    Ok(local)
}

fn route(view: &View, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let resp = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET {
        return resp(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => resp(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            view.metrics_text(),
        ),
        "/health" => match view.health() {
            // A store that does not answer makes the relay "degraded", still 200: paired
            // sessions go on and it will answer again; a load balancer or container runtime must
            // not take every node out (or restart it) while the shared database restarts.
            Some((serving, stats, store)) => {
                let up = store.up();
                let status = match (serving, up) {
                    (false, _) => "draining",
                    (true, true) => "ok",
                    (true, false) => "degraded",
                };
                let body = serde_json::json!({
                    "status": status,
                    "connections": stats.connections,
                    "sessions": stats.sessions,
                    "agents_waiting": stats.agents_waiting,
                    "store": {
                        "engine": store.engine(),
                        "state": if up { "ok" } else { "unavailable" },
                        "error": store.error(),
                    },
                })
                .to_string()
                    + "\n";
                let status = if serving {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                resp(status, "application/json", body)
            }
            None => resp(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                "{\"status\":\"stopped\"}\n".into(),
            ),
        },
        _ => resp(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}
