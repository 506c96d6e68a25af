//! The slot as PostgreSQL sees it, polled beside the pipeline: how much WAL it retains and its
//! `wal_status`, for the metrics DBAs alert on before a slot is invalidated.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::postgres;

const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Polls until `shutdown`; a failed poll is logged and retried on a fresh connection.
pub async fn run(
    database_url: String,
    slot: String,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client = None;
    loop {
        if let Err(error) = poll(&database_url, &slot, &metrics, &mut client).await {
            tracing::debug!("slot metrics: {error:#}");
            client = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn poll(
    database_url: &str,
    slot: &str,
    metrics: &Metrics,
    client: &mut Option<tokio_postgres::Client>,
) -> anyhow::Result<()> {
    let connection = match client.take() {
        Some(existing) if !existing.is_closed() => existing,
        _ => postgres::connect(database_url).await?,
    };
    match postgres::slot_info(&connection, slot).await? {
        Some(info) => metrics.set_slot(info.wal_retained_bytes, info.wal_status.as_deref()),
        None => metrics.set_slot(None, None),
    }
    *client = Some(connection);
    Ok(())
}
