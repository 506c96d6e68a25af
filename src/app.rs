//! The streamer as a process: the pipeline plus its HTTP listener, stopped by SIGTERM/SIGINT.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::{http, pipeline};

/// A shutdown switch that turns on at SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping");
        let _ = stop.send(true);
    });
    shutdown
}

/// Runs the pipeline and the HTTP listener until `shutdown` turns on or a fatal error.
pub async fn run_streamer(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let http_task = if config.http.listen.is_empty() {
        None
    } else {
        let listen = config
            .http
            .listen
            .parse()
            .map_err(|e| anyhow::anyhow!("http.listen: {e}"))?;
        let router = http::router(metrics.clone(), config.nats.stream_name.clone());
        Some(tokio::spawn(http::serve(listen, router, shutdown.clone())))
    };
    let result = pipeline::run(config, metrics, shutdown).await;
    if let Some(task) = http_task {
        task.abort();
    }
    result
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
