//! Connecting to NATS with the configured servers, credentials and TLS.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};

use crate::config::NatsConfig;
use crate::metrics::Metrics;
use crate::secrets::redact_urls;

/// JetStream for a one-shot command (`status`, `seek`, `reset-lsn`, `backfill`): gives up
/// after 10 s, and reports to no one's metrics.
pub async fn jetstream_for_command(
    config: &NatsConfig,
) -> anyhow::Result<async_nats::jetstream::Context> {
    let nats = connect(config, Arc::new(Metrics::new()), Duration::from_secs(10)).await?;
    Ok(async_nats::jetstream::new(nats))
}

/// Connects to NATS, retrying with backoff until it answers or `give_up_after` passes.
pub async fn connect(
    config: &NatsConfig,
    metrics: Arc<Metrics>,
    give_up_after: Duration,
) -> anyhow::Result<async_nats::Client> {
    let servers = parse_servers(&config.url)?;
    let mut backoff = crate::backoff::Backoff::new();
    loop {
        match options(config, metrics.clone())
            .await?
            .connect(servers.clone())
            .await
        {
            Ok(client) => {
                metrics.nats_connected.store(true, Ordering::Relaxed);
                return Ok(client);
            }
            Err(error) if backoff.elapsed() < give_up_after => {
                tracing::warn!(
                    "NATS at {} not reachable ({error}); retrying in {:?}",
                    redact_urls(&config.url),
                    backoff.peek()
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => {
                anyhow::bail!(
                    "cannot connect to NATS at {} after {:?}: {error}",
                    redact_urls(&config.url),
                    backoff.elapsed()
                )
            }
        }
    }
}

pub(super) fn parse_servers(urls: &str) -> anyhow::Result<Vec<ServerAddr>> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>().map_err(|e| {
                anyhow::anyhow!("nats.url: `{}` is not a NATS URL: {e}", redact_urls(url))
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|servers| {
            if servers.is_empty() {
                anyhow::bail!("nats.url is empty; set it to e.g. nats://127.0.0.1:4222")
            }
            Ok(servers)
        })
}

async fn options(config: &NatsConfig, metrics: Arc<Metrics>) -> anyhow::Result<ConnectOptions> {
    let mut options = match &config.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| anyhow::anyhow!("nats.credentials_file {}: {e}", path.display()))?,
        None => ConnectOptions::new(),
    };
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    match (&config.user, &config.password) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password.clone())
        }
        (None, None) => {}
        _ => anyhow::bail!("nats.user and nats.password go together: set both or neither"),
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if config.tls_required || config.tls_ca_file.is_some() || config.tls_client_cert.is_some() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    match (&config.tls_client_cert, &config.tls_client_key) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone())
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "nats.tls_client_cert and nats.tls_client_key go together: set both or neither"
        ),
    }
    Ok(options
        .name("walstream")
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match event {
                    Event::Connected => {
                        metrics.nats_connected.store(true, Ordering::Relaxed);
                        tracing::info!("NATS connected");
                    }
                    Event::Disconnected => {
                        metrics.nats_connected.store(false, Ordering::Relaxed);
                        metrics.reconnects.with_label_values(&["nats"]).inc();
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    other => tracing::info!("NATS: {other}"),
                }
            }
        }))
}
