//! The CP's loopback HTTP endpoint: `/metrics` (Prometheus text, rendered
//! from the recorder's handle), `/healthz` (the process answers) and
//! `/readyz` (registry, bus and Docker feed are up, per [`Readiness`]).
//!
//! Why our own small axum server and not the exporter's listener: one
//! listener for metrics *and* health, graceful shutdown tied to the CP's
//! cancellation token, and no extra HTTP stack (axum already comes with
//! tonic).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::listen::{self, AcceptConfig, ListenerLimits};

/// Flags the daemon sets as its parts come up (and clears if they go
/// down). Ready = all set.
#[derive(Debug, Default)]
pub struct Readiness {
    registry: AtomicBool,
    bus: AtomicBool,
    /// Shared with the Docker events feeder, which sets it as its stream
    /// connects and drops (no poller copies it over).
    docker: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn set_registry(&self, up: bool) {
        self.registry.store(up, Ordering::Release);
    }
    pub fn set_bus(&self, up: bool) {
        self.bus.store(up, Ordering::Release);
    }
    /// The Docker events feed is streaming.
    pub fn set_docker(&self, up: bool) {
        self.docker.store(up, Ordering::Release);
    }
    /// The flag behind [`Readiness::set_docker`], for the feeder to set
    /// directly.
    pub fn docker_flag(&self) -> Arc<AtomicBool> {
        self.docker.clone()
    }
    /// Parts not up yet (empty = ready).
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("registry", &self.registry),
            ("bus", &self.bus),
            ("docker", &*self.docker),
        ]
        .into_iter()
        .filter(|(_, f)| !f.load(Ordering::Acquire))
        .map(|(n, _)| n)
        .collect()
    }
    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }
}

/// Brings gauges up to date right before a scrape renders them (instead
/// of refreshing them on a timer: an idle CP does no work).
pub type Refresh = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static>;

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    refresh: Option<Refresh>,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    if let Some(refresh) = &s.refresh {
        refresh().await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.handle.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let missing = s.readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

/// The router, for embedding elsewhere; `refresh` runs before each
/// `/metrics` render.
pub fn router(
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    refresh: Option<Refresh>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            handle,
            readiness,
            refresh,
        })
}

/// Binds `addr` (use loopback; port 0 picks one) and serves until
/// `shutdown` is cancelled, with the default bounds
/// ([`ListenerLimits::METRICS`]) and no gauge refresh. Returns the bound
/// address and the server task.
pub async fn serve_metrics(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_bounded(
        addr,
        handle,
        readiness,
        None,
        ListenerLimits::METRICS,
        shutdown,
    )
    .await
}

/// [`serve_metrics`] with gauges brought up to date by `refresh` at every
/// scrape, under `limits` (the CP's fitted to its descriptor table; tests
/// use small ones). The server task ends once no new connections are
/// taken; open ones finish their request and close.
pub async fn serve_bounded(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    refresh: Option<Refresh>,
    limits: ListenerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        tracing::warn!(event = "metrics_not_loopback", %addr, "metrics endpoint bound to a non-loopback address");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(handle, readiness, refresh);
    let (task, _connections) = listen::http1::serve(
        listener,
        app,
        AcceptConfig {
            listener: "metrics",
            reject_event: "metrics_handshake_failed",
            refused_event: "metrics_connection_refused",
            limits,
            reserved: None,
        },
        shutdown,
    );
    tracing::info!(event = "metrics_listening", addr = %bound);
    Ok((bound, task))
}
