//! The HTTP listener: `/health` (JSON) and `/metrics` (Prometheus text).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::lsn::Lsn;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    stream: String,
}

pub fn router(metrics: Arc<Metrics>, stream: String) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, stream })
}

/// Serves `router` on `listen` until `shutdown` turns true; `key` is the config key that set
/// the address, for the error when it cannot be bound.
pub async fn serve(
    key: &'static str,
    listen: String,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("{key} {listen}: cannot listen: {e}"))?;
    tracing::info!("{key}: serving on http://{listen}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

/// 200 while the process answers: for liveness probes, which must not restart walstream
/// during a PostgreSQL or NATS outage it is already riding out.
async fn live() -> &'static str {
    "alive\n"
}

/// 200 when both replication and NATS are connected, 503 otherwise.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let metrics = &state.metrics;
    let replication = metrics.replication_connected.load(Ordering::Relaxed);
    let nats = metrics.nats_connected.load(Ordering::Relaxed);
    let standby = metrics.standby.get() == 1;
    // A standby is ready: it serves what it serves (GraphQL in `run`) and waits for the lease.
    let healthy = (replication || standby) && nats;
    let checkpoint = Lsn(metrics.checkpoint_lsn.get() as u64);
    let body = serde_json::json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "role": if standby { "standby" } else { "active" },
        "replication": { "connected": replication },
        "nats": { "connected": nats, "stream": state.stream },
        "checkpoint_lsn": checkpoint.to_string(),
        "lag_bytes": metrics.replication_lag_bytes.get(),
        "inflight_acks": metrics.inflight_acks.get(),
        "last_error": metrics.last_error(),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
