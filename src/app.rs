//! The processes walstream runs as: the streamer, the GraphQL server, or both; each with
//! its HTTP listener and stopped by SIGTERM/SIGINT.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::{graphql, http, pipeline};

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
    let http_task = spawn_http(&config, metrics.clone(), shutdown.clone())?;
    let result = pipeline::run(config, metrics, None, shutdown).await;
    if let Some(task) = http_task {
        task.abort();
    }
    result
}

/// `walstream serve`: the GraphQL server alone; subscriptions read the JetStream stream.
pub async fn run_graphql(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let router = graphql::router(&config, metrics, None).await?;
    http::serve(
        "graphql.listen",
        config.graphql()?.listen.clone(),
        router,
        shutdown,
    )
    .await
}

/// `walstream run`: the pipeline and the GraphQL server in one process (the sidecar);
/// subscriptions are fed by the pipeline as JetStream acknowledges each event.
pub async fn run_all(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let graphql_config = config.graphql()?.clone();
    let metrics = Arc::new(Metrics::new());
    let http_task = spawn_http(&config, metrics.clone(), shutdown.clone())?;
    let (live, _) = broadcast::channel(graphql_config.subscription_buffer);
    let router = graphql::router(&config, metrics.clone(), Some(live.clone())).await?;
    let server = http::serve(
        "graphql.listen",
        graphql_config.listen.clone(),
        router,
        shutdown.clone(),
    );
    let stopping = shutdown.clone();
    let pipeline = pipeline::run(config, metrics, Some(live), shutdown);
    tokio::pin!(pipeline);
    // Either failing ends the process: a sidecar that lost half of itself should restart.
    let result = tokio::select! {
        result = &mut pipeline => result,
        result = server => match result {
            // A graceful stop closes the server first; the pipeline still drains its acks.
            Ok(()) if *stopping.borrow() => pipeline.await,
            Ok(()) => Err(anyhow::anyhow!("the GraphQL server stopped")),
            Err(error) => Err(error),
        },
    };
    if let Some(task) = http_task {
        task.abort();
    }
    result
}

fn spawn_http(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    if config.http.listen.is_empty() {
        return Ok(None);
    }
    let router = http::router(metrics, config.nats.stream_name.clone());
    Ok(Some(tokio::spawn(http::serve(
        "http.listen",
        config.http.listen.clone(),
        router,
        shutdown,
    ))))
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
