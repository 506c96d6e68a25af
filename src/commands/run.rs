//! The processes walstream runs as: the streamer, the GraphQL server, or both; each with
//! its HTTP listener and stopped by SIGTERM/SIGINT.

use std::sync::Arc;

use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{broadcast, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::sink::StoredEvent;
use crate::pipeline::{self, lease};
use crate::{graphql, http, nats};

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
    let result = stream(config, metrics, None, shutdown).await;
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
    // With [ha], this instance may be a standby whose pipeline does not run: subscriptions
    // then read the JetStream stream, as in `serve`, so they work on every instance.
    let live =
        (!config.ha.enabled).then(|| broadcast::channel(graphql_config.subscription_buffer).0);
    let router = graphql::router(&config, metrics.clone(), live.clone()).await?;
    let server = http::serve(
        "graphql.listen",
        graphql_config.listen.clone(),
        router,
        shutdown.clone(),
    );
    let stopping = shutdown.clone();
    let pipeline = stream(config, metrics, live, shutdown);
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

/// The pipeline, alone or, with `[ha] enabled`, whenever this instance holds the slot's lease.
async fn stream(
    config: Config,
    metrics: Arc<Metrics>,
    subscribers: Option<broadcast::Sender<Arc<StoredEvent>>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !config.ha.enabled {
        return pipeline::run(config, metrics, subscribers, shutdown).await;
    }
    let ttl = Duration::from_secs(config.ha.lease_secs);
    let nats = nats::connect(&config.nats, metrics.clone(), Duration::from_secs(60)).await?;
    let js = jetstream::new(nats);
    let store = nats::ensure_key_value(
        &js,
        lease::BUCKET,
        "walstream leases: which instance streams each slot",
        ttl,
        config.nats.jetstream.replicas,
    )
    .await?;
    let holder = lease::holder_name();
    let slot = config.replication.slot.clone();
    loop {
        metrics.standby.set(1);
        let Some(held) = lease::acquire(store.clone(), &slot, &holder, ttl, shutdown.clone()).await
        else {
            return Ok(());
        };
        metrics.standby.set(0);
        tracing::info!(slot = %slot, holder = %holder, "lease acquired: streaming");
        let (lost_tx, lost) = watch::channel(false);
        let (stop_keeping, keeping) = watch::channel(false);
        let keeper = tokio::spawn(held.keep(lost_tx, keeping));
        let stop_pipeline = either(shutdown.clone(), lost.clone());
        let result = pipeline::run(
            config.clone(),
            metrics.clone(),
            subscribers.clone(),
            stop_pipeline,
        )
        .await;
        let _ = stop_keeping.send(true);
        let held = keeper.await?;
        if *lost.borrow() && !*shutdown.borrow() {
            // Stopped only because the lease is gone; a successor streams now.
            if let Err(error) = result {
                tracing::warn!("after losing the lease: {error:#}");
            }
            continue;
        }
        held.release().await;
        return result;
    }
}

/// Turns on when either switch does.
fn either(first: watch::Receiver<bool>, second: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*first.borrow() || *second.borrow());
    tokio::spawn(async move {
        // A switch whose sender is gone can no longer turn on; wait on the other.
        let turned_on = |mut switch: watch::Receiver<bool>| async move {
            let on = switch.wait_for(|on| *on).await.is_ok();
            if !on {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = turned_on(first) => {}
            _ = turned_on(second) => {}
        }
        let _ = tx.send(true);
    });
    rx
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
