//! The Prometheus scrape endpoint (`metrics = "ADDR"` in the config).
//!
//! HTTP/1 is hyper's; the listener is ours. `metrics-exporter-prometheus` brings a listener of
//! its own, but it accepts without limit, keeps a silent connection for as long as the client
//! likes and answers every path with the metrics. The endpoint is often bound to a routable
//! address for the scraper, so anyone who can reach it could hold the agent's descriptors, the
//! ones its store needs to commit marks (docs/security.md, "Metrics endpoint"). Here the
//! connections are capped ([`MAX_CONNECTIONS`], the rest closed at once), a connection must send
//! its request head within [`HEADER_TIMEOUT`] and is closed after [`CONNECTION_LIFETIME`],
//! and only `GET`/`HEAD /metrics` answers 200.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapers are few (one or two Prometheus servers, an operator's curl); connections past this
/// are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent a whole request head by then is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection, keep-alive or not, lives longer than this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How often histograms and summaries are folded (what the exporter's own listener did).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// The text exposition format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder is installed in this process.
    #[error("installing the Prometheus recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    /// The address could not be bound.
    #[error("listening for metrics scrapes on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Install the process's Prometheus recorder and bind `addr`; returns the handle that renders
/// the metrics and the bound listener, for [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<(PrometheusHandle, TcpListener), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    Ok((handle, listener))
}

/// Answer scrapes on `listener` until the task is dropped; also runs the recorder's upkeep.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    };
    let _upkeep = AbortOnDrop(upkeep);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused_said: Option<tokio::time::Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: the control server says the same; back off rather than
                // spin on a listener that stays readable.
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("bitferry_metrics_refused_total").increment(1);
            // Once a minute at most: a flood must not become a log flood.
            if refused_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "too many metrics connections; closing the ones past the cap"
                );
                refused_said = Some(tokio::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(handle.clone(), req));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
            }
        });
    }
}

/// One request: the metrics for `GET`/`HEAD /metrics`, 404 for another path, 405 for another
/// method.
async fn answer(
    handle: PrometheusHandle,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, handle.render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "bitferry serves its metrics at /metrics\n".to_string(),
        ),
    };
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    Ok(resp)
}

/// Aborts a spawned task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
