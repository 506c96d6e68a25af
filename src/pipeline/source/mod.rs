//! The replication source: finds the primary among database.url's hosts, reads its timeline
//! history, and opens the slot's stream with the session settings that make values decode the
//! same way everywhere.

mod protocol;
mod session;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::config::Config;
use crate::lsn::Lsn;
use crate::pipeline::timeline::History;

pub use protocol::WalMessage;
pub use session::SessionError;
pub use stream::ReplicationStream;

use session::{Login, Row, Session};

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
    login: Login,
    hosts: Vec<(String, u16)>,
    slot: String,
    publication: String,
    status_interval: Duration,
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
        let tls = match tls.enabled() {
            true => Some(Arc::new(tls.client_config()?)),
            false => None,
        };
        let repl = &config.replication;
        Ok(Self {
            login: Login {
                user,
                password,
                database,
                application_name: format!("walstream:{}", repl.slot),
                options: SESSION_OPTIONS,
                tls,
            },
            hosts,
            slot: repl.slot.clone(),
            publication: repl.publication.clone(),
            status_interval: Duration::from_secs(repl.status_interval_secs),
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
            let mut session = self.connect(host).await?;
            let answer = self.identify_primary(&mut session).await;
            session.close().await;
            answer
        };
        tokio::time::timeout(CONNECT_TIMEOUT, probe)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
    }

    async fn identify_primary(&self, session: &mut Session) -> anyhow::Result<Option<History>> {
        if first_value(session.simple_query("SELECT pg_is_in_recovery()").await?) == "t" {
            return Ok(None);
        }
        let history = match session.timeline().await? {
            1 => History::first(1),
            timeline => {
                let file = session.timeline_history(timeline).await?;
                History::parse(timeline, &file)?
            }
        };
        if self.failover {
            self.make_failover_slot(session).await?;
        }
        Ok(Some(history))
    }

    /// A slot created before `replication.failover` was turned on does not follow a failover
    /// until it is altered; the replication command does that (the slot must not be in use).
    async fn make_failover_slot(&self, session: &mut Session) -> anyhow::Result<()> {
        let slot = &self.slot;
        let query = format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = {}",
            escape_literal(slot)
        );
        if first_value(session.simple_query(&query).await?) != "f" {
            return Ok(());
        }
        session
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
    ) -> anyhow::Result<ReplicationStream> {
        let display = self.display(primary.host);
        let connect = async {
            let mut session = self.connect(primary.host).await?;
            let timeline = session.timeline().await?;
            if timeline != primary.history.current {
                anyhow::bail!(
                    "the server moved from timeline {} to {timeline} while walstream connected",
                    primary.history.current
                );
            }
            let command = self.start_command(start);
            Ok(ReplicationStream::start(session, &command, durable, self.status_interval).await?)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(anyhow::anyhow!(
                "cannot start replication on {display} (slot {}): {error:#}",
                self.slot
            )),
            Err(_) => Err(anyhow::anyhow!(
                "starting replication on {display} timed out after {CONNECT_TIMEOUT:?}"
            )),
        }
    }

    /// START_REPLICATION of the slot from `start`, with the messages that pgoutput's protocol
    /// version 1 carries, logical messages included.
    fn start_command(&self, start: Lsn) -> String {
        format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', \
             publication_names '{}', messages 'true')",
            escape_identifier(&self.slot),
            self.publication.replace('\'', "''"),
        )
    }

    async fn connect(&self, host: usize) -> Result<Session, SessionError> {
        let (name, port) = &self.hosts[host];
        Session::connect(&self.login, name, *port).await
    }

    fn display(&self, host: usize) -> String {
        let (name, port) = &self.hosts[host];
        format!("{}@{name}:{port}/{}", self.login.user, self.login.database)
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
fn first_value(rows: Vec<Row>) -> String {
    rows.into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten())
        .unwrap_or_default()
}
