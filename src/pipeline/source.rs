//! The replication source: finds the primary among database.url's hosts, reads its timeline
//! history, and opens the slot's stream over pgwire-replication with the session settings that
//! make values decode the same way everywhere.

use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::config::Config;
use crate::lsn::Lsn;
use crate::pipeline::timeline::History;

/// Pins how the walsender renders values: UTC, ISO dates and intervals, hex bytea, shortest
/// exact floats. pgoutput formats text values with these session settings.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 \
     -c extra_float_digits=1 -c bytea_output=hex";

/// The same settings for a normal session, so `value::text` reads what pgoutput would send
/// (`walstream backfill`).
pub const SESSION_SETTINGS_SQL: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 1; SET bytea_output = 'hex'";

/// Where and how to connect for replication, derived from `[database] url`: every host it
/// names, of which walstream streams from the one that is a primary.
#[derive(Clone)]
pub struct ReplicationTarget {
    /// The session settings; its host and port are those of the host being tried.
    config: ReplicationConfig,
    hosts: Vec<(String, u16)>,
    user: String,
    database: String,
    /// Make the slot a failover slot where it is not one yet.
    failover: bool,
}

/// The host that answered as a primary, and what it said of its WAL history.
pub struct Primary {
    host: usize,
    pub history: History,
}

impl ReplicationTarget {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let (parsed, tls) = crate::postgres::parse_url(&config.database.url)?;
        let ports = parsed.get_ports();
        let hosts: Vec<(String, u16)> = parsed
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let name = match host {
                    tokio_postgres::config::Host::Tcp(host) => host.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                };
                // libpq: one port for every host, or one per host.
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                (name, port)
            })
            .collect();
        let hosts = if hosts.is_empty() {
            vec![(
                "localhost".to_owned(),
                ports.first().copied().unwrap_or(5432),
            )]
        } else {
            hosts
        };
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
            hosts[0].0.clone(),
            user.clone(),
            password,
            database.clone(),
            repl.slot.clone(),
            repl.publication.clone(),
        )
        .with_port(hosts[0].1)
        .with_tls(tls.replication())
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("walstream:{}", repl.slot))
        .with_status_interval(Duration::from_secs(repl.status_interval_secs))
        .with_wakeup_interval(Duration::from_secs(repl.status_interval_secs.max(1)))
        .with_buffer_size(8192);
        Ok(Self {
            config: replication,
            hosts,
            user,
            database,
            failover: repl.failover,
        })
    }

    /// Finds the primary among the hosts, in their order, and reads its timeline history.
    /// With `replication.failover`, it also makes the slot a failover slot there.
    pub async fn find_primary(&self) -> anyhow::Result<Primary> {
        let mut seen = Vec::new();
        for host in 0..self.hosts.len() {
            match self.probe(host).await {
                Ok(Some(history)) => return Ok(Primary { host, history }),
                Ok(None) => seen.push(format!("{} is a standby (in recovery)", self.display(host))),
                Err(error) => seen.push(format!("{}: {error:#}", self.display(host))),
            }
        }
        match seen.as_slice() {
            [only] if self.hosts.len() == 1 => anyhow::bail!("{only}"),
            _ => anyhow::bail!(
                "no primary among the hosts of database.url: {}",
                seen.join("; ")
            ),
        }
    }

    /// The host's history when it is a primary, `None` when it is a standby.
    async fn probe(&self, host: usize) -> anyhow::Result<Option<History>> {
        let probe = async {
            let mut client = ReplicationClient::connect_gated(self.for_host(host)).await?;
            if first_value(client.simple_query("SELECT pg_is_in_recovery()").await?) == "t" {
                return Ok(None);
            }
            let system = client.identify_system().await?;
            let history = match system.timeline {
                1 => History::first(1),
                timeline => {
                    let file = client.timeline_history(timeline).await?;
                    History::parse(timeline, &String::from_utf8_lossy(&file.content))?
                }
            };
            if self.failover {
                self.make_failover_slot(&mut client).await?;
            }
            Ok::<_, anyhow::Error>(Some(history))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, probe)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
    }

    /// A slot created before `replication.failover` was turned on does not follow a failover
    /// until it is altered; the replication command does that (the slot must not be in use).
    async fn make_failover_slot(&self, client: &mut ReplicationClient) -> anyhow::Result<()> {
        let slot = &self.config.slot;
        let query = format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = {}",
            escape_literal(slot)
        );
        if first_value(client.simple_query(&query).await?) != "f" {
            return Ok(());
        }
        client
            .simple_query(&format!(
                "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
                escape_identifier(slot)
            ))
            .await
            .map_err(|e| anyhow::anyhow!("cannot make slot {slot} a failover slot: {e}"))?;
        tracing::info!(slot = %slot, "the slot is now a failover slot (replication.failover)");
        Ok(())
    }

    /// Starts streaming the slot on `primary` from `start` (0/0: the slot's confirmed
    /// position), reporting `durable` as confirmed until told otherwise. The server must still
    /// be on the timeline it was found on.
    pub async fn start(
        &self,
        primary: &Primary,
        start: Lsn,
        durable: Lsn,
    ) -> anyhow::Result<ReplicationClient> {
        let config = self
            .for_host(primary.host)
            .with_start_lsn(start)
            .with_ack_lsn(durable);
        let display = self.display(primary.host);
        let connect = async {
            let mut client = ReplicationClient::connect_gated(config).await?;
            let timeline = client.identify_system().await?.timeline;
            if timeline != primary.history.current {
                anyhow::bail!(
                    "the server moved from timeline {} to {timeline} while walstream connected",
                    primary.history.current
                );
            }
            client.start().await?;
            client.wait_started().await?;
            Ok(client)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(anyhow::anyhow!(
                "cannot start replication on {display} (slot {}): {error:#}",
                self.config.slot
            )),
            Err(_) => Err(anyhow::anyhow!(
                "starting replication on {display} timed out after {CONNECT_TIMEOUT:?}"
            )),
        }
    }

    fn for_host(&self, host: usize) -> ReplicationConfig {
        let mut config = self.config.clone();
        (config.host, config.port) = self.hosts[host].clone();
        config
    }

    fn display(&self, host: usize) -> String {
        let (name, port) = &self.hosts[host];
        format!("{}@{name}:{port}/{}", self.user, self.database)
    }

    /// Every host, for the log.
    pub fn display_all(&self) -> String {
        (0..self.hosts.len())
            .map(|h| self.display(h))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The primary's address, for the log.
    pub fn display_primary(&self, primary: &Primary) -> String {
        self.display(primary.host)
    }
}

/// How long connecting to one host for replication may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first column of the first row, as text (empty when there is none).
fn first_value(rows: Vec<pgwire_replication::client::QueryRow>) -> String {
    rows.into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten())
        .map(|value| String::from_utf8_lossy(&value).into_owned())
        .unwrap_or_default()
}
