//! The replication source: opens the slot's stream over pgwire-replication with the session
//! settings that make values decode the same way everywhere.

use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};

use crate::config::Config;
use crate::lsn::Lsn;

/// Pins how the walsender renders values: UTC, ISO dates and intervals, hex bytea, shortest
/// exact floats. pgoutput formats text values with these session settings.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 \
     -c extra_float_digits=1 -c bytea_output=hex";

/// The same settings for a normal session, so `value::text` reads what pgoutput would send
/// (`walstream backfill`).
pub const SESSION_SETTINGS_SQL: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 1; SET bytea_output = 'hex'";

/// Where and how to connect for replication, derived from `[database] url`.
#[derive(Clone)]
pub struct ReplicationTarget {
    config: ReplicationConfig,
    display: String,
}

impl ReplicationTarget {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let (parsed, tls) = crate::postgres::parse_url(&config.database.url)?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let user = parsed
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| anyhow::anyhow!("database.url names no user"))?;
        let password = parsed
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = parsed
            .get_dbname()
            .map(str::to_owned)
            .unwrap_or_else(|| user.clone());
        let repl = &config.replication;
        let replication = ReplicationConfig::new(
            host.clone(),
            user.clone(),
            password,
            database.clone(),
            repl.slot.clone(),
            repl.publication.clone(),
        )
        .with_port(port)
        .with_tls(tls.replication())
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("walstream:{}", repl.slot))
        .with_status_interval(Duration::from_secs(repl.status_interval_secs))
        .with_wakeup_interval(Duration::from_secs(repl.status_interval_secs.max(1)))
        .with_buffer_size(8192);
        Ok(Self {
            config: replication,
            display: format!("{user}@{host}:{port}/{database}"),
        })
    }

    /// Starts streaming the slot from `start` (0/0: the slot's confirmed position), reporting
    /// `durable` as confirmed until told otherwise.
    pub async fn start(&self, start: Lsn, durable: Lsn) -> anyhow::Result<ReplicationClient> {
        let config = self
            .config
            .clone()
            .with_start_lsn(start)
            .with_ack_lsn(durable);
        let connect = async {
            let mut client = ReplicationClient::connect(config).await?;
            client.wait_started().await?;
            Ok::<_, pgwire_replication::PgWireError>(client)
        };
        match tokio::time::timeout(Duration::from_secs(30), connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(anyhow::anyhow!(
                "cannot start replication on {} (slot {}): {error}",
                self.display,
                self.config.slot
            )),
            Err(_) => Err(anyhow::anyhow!(
                "starting replication on {} timed out after 30 s",
                self.display
            )),
        }
    }

    pub fn display(&self) -> &str {
        &self.display
    }
}
