//! `walstream.toml`: parsing, `${VAR}` interpolation and validation. Every key is used; an
//! unknown key is an error that names it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::op::Op;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Table → entity name overrides, e.g. `tb_order_item = "LineItem"`.
    #[serde(default)]
    pub entities: BTreeMap<String, String>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub ha: HaConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The GraphQL front end (`walstream serve` / `walstream run`).
    pub graphql: Option<GraphqlConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/dbname?sslmode=…`
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(default = "defaults::slot")]
    pub slot: String,
    #[serde(default = "defaults::publication")]
    pub publication: String,
    /// Schema-qualified tables to stream (`public.tb_order`).
    pub tables: Vec<String>,
    #[serde(default = "defaults::yes")]
    pub create_slot: bool,
    #[serde(default = "defaults::yes")]
    pub create_publication: bool,
    /// How often the confirmed position is reported to PostgreSQL.
    #[serde(default = "defaults::status_interval_secs")]
    pub status_interval_secs: u64,
    /// Emit a heartbeat logical message this often so the slot advances on a quiet database
    /// (0 turns it off).
    #[serde(default = "defaults::heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// After this long without a message, check that the server still hears walstream, and
    /// reconnect when it does not (a dead TCP link).
    #[serde(default = "defaults::receive_timeout_secs")]
    pub receive_timeout_secs: u64,
    /// How much WAL the slot keeps behind the checkpoint so `reset-lsn` can go back: a size
    /// (`"10GB"`) or a time (`"2h"`). PostgreSQL keeps that WAL on disk.
    #[serde(default, deserialize_with = "deserialize_retention")]
    pub replay_retention: Retention,
    /// Per table: which columns and rows the publication publishes (PostgreSQL 15+).
    #[serde(default, rename = "table")]
    pub table_filters: Vec<TableFilter>,
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys with
    /// `sync_replication_slots = on` keep in step, so walstream goes on from a promoted standby.
    #[serde(default)]
    pub failover: bool,
}

/// `[[replication.table]]`: what the publication publishes of one table. A column left out
/// never leaves the database (not in an event, not in a backfill); a row outside `where`
/// produces no event.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableFilter {
    /// The table, as in `replication.tables`.
    pub name: String,
    /// The published columns (a publication column list); all when absent.
    pub columns: Option<Vec<String>>,
    /// A row filter, an SQL condition on the row (a publication `WHERE`).
    #[serde(rename = "where")]
    pub filter: Option<String>,
}

fn deserialize_retention<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Retention, D::Error> {
    let text = String::deserialize(deserializer)?;
    Retention::parse(&text).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    #[serde(default = "defaults::checkpoint_path")]
    pub path: PathBuf,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            path: defaults::checkpoint_path(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// One URL or a comma-separated list.
    #[serde(default = "defaults::nats_url")]
    pub url: String,
    #[serde(default = "defaults::stream_name")]
    pub stream_name: String,
    #[serde(default = "defaults::subject_prefix")]
    pub subject_prefix: String,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub nkey_seed: Option<String>,
    #[serde(default)]
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// Publishes awaiting their JetStream ack at once.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// How long to wait for one ack before the publish is retried.
    #[serde(default = "defaults::ack_timeout_secs")]
    pub ack_timeout_secs: u64,
    /// Whether a transaction's events are stored one by one or as one atomic batch.
    #[serde(default)]
    pub transactions: TransactionMode,
    /// Publish in fast-ingest batches where the server has them (nats-server 2.14+); false
    /// keeps the message-by-message path.
    #[serde(default = "defaults::fast_ingest")]
    pub fast_ingest: bool,
    #[serde(default)]
    pub jetstream: JetStreamConfig,
}

/// `nats.transactions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransactionMode {
    /// Each event is stored on its own: a consumer may read a transaction's first events
    /// before its last one is stored.
    #[default]
    Independent,
    /// Each transaction is stored as one atomic batch (nats-server 2.12.1+): a consumer never
    /// sees part of one, unless it is larger than a batch may be.
    Atomic,
}

impl Default for NatsConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every NATS key has a default"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    #[serde(default = "defaults::dedup_window_minutes")]
    pub dedup_window_minutes: u64,
    #[serde(default = "defaults::max_age_days")]
    pub max_age_days: u64,
    #[serde(default = "defaults::max_msgs")]
    pub max_msgs: i64,
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: i64,
    #[serde(default = "defaults::replicas")]
    pub replicas: usize,
    #[serde(default)]
    pub storage: StorageKind,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every JetStream key has a default"))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    File,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub table: String,
    pub event: String,
    pub subject: String,
}

/// High availability: several instances for one slot, one streaming at a time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Take a lease in the JetStream key-value bucket `walstream_leases` before streaming.
    #[serde(default)]
    pub enabled: bool,
    /// A lease not renewed for this long expires, and a standby takes over.
    #[serde(default = "defaults::lease_secs")]
    pub lease_secs: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_secs: defaults::lease_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the `/health` and `/metrics` listener; empty turns it off.
    #[serde(default = "defaults::http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: defaults::http_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// The SDL file, relative to the config file's directory.
    pub schema: PathBuf,
    #[serde(default = "defaults::graphql_listen")]
    pub listen: String,
    /// PostgreSQL connections the GraphQL server keeps.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    #[serde(default = "defaults::max_depth")]
    pub max_depth: usize,
    #[serde(default = "defaults::max_complexity")]
    pub max_complexity: usize,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Operations one POST may carry as a JSON array (a batch).
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    /// Seconds a WebSocket may stay open without `connection_init` before it is closed (4408).
    #[serde(default = "defaults::connection_init_timeout_secs")]
    pub connection_init_timeout_secs: u64,
    /// Rows a list query returns when it gives no `limit`, and the most it may ask for.
    #[serde(default = "defaults::default_limit")]
    pub default_limit: i64,
    #[serde(default = "defaults::max_limit")]
    pub max_limit: i64,
    #[serde(default = "defaults::yes")]
    pub introspection: bool,
    /// Serve GraphiQL at `GET /graphql`.
    #[serde(default = "defaults::yes")]
    pub graphiql: bool,
    /// Events a live subscription may fall behind before it is stopped with an error.
    #[serde(default = "defaults::subscription_buffer")]
    pub subscription_buffer: usize,
    /// The PostgreSQL role requests without a token run as; unset: they are refused.
    pub anonymous_role: Option<String>,
    #[serde(default)]
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub hs256_secret: Option<String>,
    /// RS256 public key (PEM).
    pub rs256_public_key_file: Option<PathBuf>,
    /// A JWKS document (RS256/ES256 keys chosen by `kid`).
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim naming the PostgreSQL role to `SET LOCAL ROLE` to.
    #[serde(default = "defaults::role_claim")]
    pub role_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "defaults::leeway_secs")]
    pub leeway_secs: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `walstream=debug`; `RUST_LOG` overrides it.
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

mod defaults {
    use std::path::PathBuf;

    pub fn slot() -> String {
        "walstream".into()
    }
    pub fn publication() -> String {
        "walstream".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn status_interval_secs() -> u64 {
        1
    }
    pub fn heartbeat_secs() -> u64 {
        10
    }
    pub fn receive_timeout_secs() -> u64 {
        30
    }
    pub fn checkpoint_path() -> PathBuf {
        PathBuf::from("walstream-data")
    }
    pub fn nats_url() -> String {
        "nats://127.0.0.1:4222".into()
    }
    pub fn stream_name() -> String {
        "fraiseql_events".into()
    }
    pub fn subject_prefix() -> String {
        "fraiseql.mutation".into()
    }
    pub fn max_inflight() -> usize {
        1024
    }
    pub fn fast_ingest() -> bool {
        true
    }
    pub fn ack_timeout_secs() -> u64 {
        5
    }
    pub fn dedup_window_minutes() -> u64 {
        5
    }
    pub fn max_age_days() -> u64 {
        7
    }
    pub fn max_msgs() -> i64 {
        10_000_000
    }
    pub fn max_bytes() -> i64 {
        10_737_418_240
    }
    pub fn replicas() -> usize {
        1
    }
    pub fn lease_secs() -> u64 {
        5
    }
    pub fn http_listen() -> String {
        "127.0.0.1:9187".into()
    }
    pub fn graphql_listen() -> String {
        "127.0.0.1:8080".into()
    }
    pub fn pool_size() -> usize {
        16
    }
    pub fn statement_timeout_ms() -> u64 {
        5000
    }
    pub fn max_depth() -> usize {
        10
    }
    pub fn max_complexity() -> usize {
        1000
    }
    pub fn max_body_bytes() -> usize {
        1 << 20
    }
    pub fn max_batch() -> usize {
        10
    }
    pub fn connection_init_timeout_secs() -> u64 {
        10
    }
    pub fn default_limit() -> i64 {
        100
    }
    pub fn max_limit() -> i64 {
        1000
    }
    pub fn subscription_buffer() -> usize {
        1024
    }
    pub fn role_claim() -> String {
        "role".into()
    }
    pub fn leeway_secs() -> u64 {
        30
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut config = Self::parse(&text, path, &|name| std::env::var(name).ok())?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Files named in the config are relative to the config file, not to the working directory.
    fn resolve_paths(&mut self, base: &Path) {
        if self.checkpoint.path.is_relative() {
            self.checkpoint.path = base.join(&self.checkpoint.path);
        }
        if let Some(graphql) = &mut self.graphql {
            let auth = &mut graphql.auth;
            for path in [
                Some(&mut graphql.schema),
                auth.rs256_public_key_file.as_mut(),
                auth.jwks_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
    }

    /// Parses config text; `env` looks up variables for `${VAR}` interpolation.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let key_error = |key: String, message: String| ConfigError::Key {
            path: path.to_owned(),
            key,
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for (key, value) in table.iter_mut() {
            interpolate_value(value, key, env).map_err(|(key, message)| key_error(key, message))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| key_error(e.path().to_string(), e.into_inner().to_string()))?;
        config
            .validate()
            .map_err(|(key, message)| key_error(key.into(), message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        check_database_url(&self.database.url).map_err(|m| ("database.url", m))?;
        let repl = &self.replication;
        check_identifier(&repl.slot).map_err(|m| ("replication.slot", m))?;
        check_identifier(&repl.publication).map_err(|m| ("replication.publication", m))?;
        if self.ha.enabled && self.ha.lease_secs < 2 {
            return Err((
                "ha.lease_secs",
                "must be at least 2: the lease is renewed every third of it".into(),
            ));
        }
        if repl.tables.is_empty() {
            return Err((
                "replication.tables",
                "lists no table; name the tables to stream, e.g. [\"public.tb_order\"]".into(),
            ));
        }
        for table in &repl.tables {
            parse_qualified_table(table).map_err(|m| ("replication.tables", m))?;
        }
        self.validate_table_filters()
            .map_err(|m| ("replication.table", m))?;
        if repl.status_interval_secs == 0 {
            return Err((
                "replication.status_interval_secs",
                "must be at least 1".into(),
            ));
        }
        if repl.receive_timeout_secs < 5 {
            return Err((
                "replication.receive_timeout_secs",
                "must be at least 5".into(),
            ));
        }
        check_subject(&self.nats.subject_prefix, false).map_err(|m| ("nats.subject_prefix", m))?;
        check_stream_name(&self.nats.stream_name).map_err(|m| ("nats.stream_name", m))?;
        if self.nats.max_inflight == 0 {
            return Err(("nats.max_inflight", "must be at least 1".into()));
        }
        if self.nats.ack_timeout_secs == 0 {
            return Err(("nats.ack_timeout_secs", "must be at least 1".into()));
        }
        let js = &self.nats.jetstream;
        if !(1..=1440).contains(&js.dedup_window_minutes) {
            return Err((
                "nats.jetstream.dedup_window_minutes",
                format!("{} is outside 1..=1440", js.dedup_window_minutes),
            ));
        }
        if !(1..=5).contains(&js.replicas) {
            return Err((
                "nats.jetstream.replicas",
                format!("{} is outside 1..=5 (JetStream's limit)", js.replicas),
            ));
        }
        if js.max_msgs == 0 || js.max_bytes == 0 {
            return Err((
                "nats.jetstream.max_msgs",
                "max_msgs and max_bytes must be positive, or -1 for unlimited".into(),
            ));
        }
        for route in &self.routes {
            route.event.parse::<Op>().map_err(|m| ("routes.event", m))?;
            check_subject(&route.subject, false).map_err(|m| ("routes.subject", m))?;
            self.resolve_table(&route.table)
                .map_err(|m| ("routes.table", m))?;
        }
        for (table, entity) in &self.entities {
            self.resolve_table(table).map_err(|m| ("entities", m))?;
            check_subject(entity, false).map_err(|m| ("entities", format!("{table}: {m}")))?;
            if entity.contains('.') {
                return Err((
                    "entities",
                    format!("{table}: entity `{entity}` contains a `.`"),
                ));
            }
        }
        if let Some(graphql) = &self.graphql {
            graphql.validate()?;
        }
        if !self.http.listen.is_empty() {
            self.http
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| ("http.listen", format!("`{}`: {e}", self.http.listen)))?;
        }
        Ok(())
    }

    /// Resolves a table as written in a route or entity override (`tb_order` or `public.tb_order`)
    /// to one of the watched tables.
    /// The column list and row filter configured for `qualified_table`, if any.
    pub fn table_filter(&self, qualified_table: &str) -> Option<&TableFilter> {
        self.replication
            .table_filters
            .iter()
            .find(|filter| self.resolve_table(&filter.name).as_deref() == Ok(qualified_table))
    }

    fn validate_table_filters(&self) -> Result<(), String> {
        let mut seen = Vec::new();
        for filter in &self.replication.table_filters {
            let table = self.resolve_table(&filter.name).map_err(|m| {
                format!("{m}; a [[replication.table]] refines a table listed there")
            })?;
            if seen.contains(&table) {
                return Err(format!("{table} appears twice; give it one entry"));
            }
            if filter.columns.is_none() && filter.filter.is_none() {
                return Err(format!("{table}: give `columns`, `where`, or both"));
            }
            if let Some(columns) = &filter.columns {
                if columns.is_empty() {
                    return Err(format!(
                        "{table}: `columns` is empty; leave it out to publish every column"
                    ));
                }
                for (index, column) in columns.iter().enumerate() {
                    if column.trim().is_empty() {
                        return Err(format!("{table}: an empty column name in `columns`"));
                    }
                    if columns[..index].contains(column) {
                        return Err(format!("{table}: column `{column}` is listed twice"));
                    }
                }
            }
            if filter
                .filter
                .as_deref()
                .is_some_and(|w| w.trim().is_empty())
            {
                return Err(format!(
                    "{table}: `where` is empty; leave it out to publish every row"
                ));
            }
            seen.push(table);
        }
        Ok(())
    }

    pub fn resolve_table(&self, name: &str) -> Result<String, String> {
        let watched = &self.replication.tables;
        if name.contains('.') {
            return watched
                .iter()
                .find(|t| t.as_str() == name)
                .cloned()
                .ok_or_else(|| format!("`{name}` is not in replication.tables"));
        }
        let matches: Vec<&String> = watched
            .iter()
            .filter(|t| t.rsplit('.').next() == Some(name))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("`{name}` is not in replication.tables")),
            _ => Err(format!(
                "`{name}` is ambiguous: it is in several schemas; write it schema-qualified"
            )),
        }
    }

    /// The GraphQL section, or an error saying how to add it.
    pub fn graphql(&self) -> anyhow::Result<&GraphqlConfig> {
        self.graphql.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "the config has no [graphql] section; add one with at least \
                 `schema = \"schema.graphql\"`"
            )
        })
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_secs(self.nats.ack_timeout_secs)
    }
}

impl GraphqlConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| ("graphql.listen", format!("`{}`: {e}", self.listen)))?;
        for (key, value) in [
            ("graphql.pool_size", self.pool_size),
            ("graphql.max_depth", self.max_depth),
            ("graphql.max_complexity", self.max_complexity),
            ("graphql.max_body_bytes", self.max_body_bytes),
            ("graphql.max_batch", self.max_batch),
            (
                "graphql.connection_init_timeout_secs",
                self.connection_init_timeout_secs as usize,
            ),
            ("graphql.subscription_buffer", self.subscription_buffer),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if self.default_limit < 1 || self.max_limit < self.default_limit {
            return Err((
                "graphql.max_limit",
                "need 1 <= default_limit <= max_limit".into(),
            ));
        }
        let auth = &self.auth;
        let keys = [
            auth.hs256_secret.is_some(),
            auth.rs256_public_key_file.is_some(),
            auth.jwks_file.is_some(),
        ];
        match keys.iter().filter(|k| **k).count() {
            0 if self.anonymous_role.is_none() => Err((
                "graphql.auth",
                "no way to authenticate: set one of hs256_secret, rs256_public_key_file or \
                 jwks_file, or set graphql.anonymous_role to serve requests without a token"
                    .into(),
            )),
            0 | 1 => Ok(()),
            _ => Err((
                "graphql.auth",
                "set only one of hs256_secret, rs256_public_key_file and jwks_file".into(),
            )),
        }
    }
}

/// A PostgreSQL URL walstream can use, its TLS settings included.
fn check_database_url(url: &str) -> Result<(), String> {
    let (plain, _) = crate::tls::split_url(url)?;
    plain
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a PostgreSQL URL: {e}"))
}

/// Splits `schema.table`, refusing anything else.
pub fn parse_qualified_table(name: &str) -> Result<(&str, &str), String> {
    match name.split_once('.') {
        Some((schema, table))
            if !schema.is_empty() && !table.is_empty() && !table.contains('.') =>
        {
            Ok((schema, table))
        }
        _ => Err(format!(
            "`{name}` is not schema-qualified; write it as schema.table, e.g. `public.{name}`"
        )),
    }
}

/// Slot and publication names: PostgreSQL allows only these in a slot's name, and reads the
/// publication names of START_REPLICATION as unquoted identifiers, folding upper case.
fn check_identifier(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1 to 63 characters of a-z, 0-9 and _"
        ))
    }
}

/// A NATS subject (or prefix): dot-separated non-empty tokens without whitespace or wildcards.
pub fn check_subject(subject: &str, allow_wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("is empty".into());
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(format!(
                "`{subject}` has an empty token (a leading, trailing or double `.`)"
            ));
        }
        if token.chars().any(char::is_whitespace) {
            return Err(format!("`{subject}` contains whitespace"));
        }
        if !allow_wildcards && (token == "*" || token == ">") {
            return Err(format!("`{subject}` contains a wildcard"));
        }
    }
    Ok(())
}

fn check_stream_name(name: &str) -> Result<(), String> {
    let invalid = name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if invalid {
        Err(format!(
            "`{name}` must be non-empty without whitespace, `.`, `*`, `>`, `/` or `\\`"
        ))
    } else {
        Ok(())
    }
}

type InterpolationError = (String, String);

fn interpolate_value(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), InterpolationError> {
    match value {
        toml::Value::String(text) => {
            *text = interpolate(text, env).map_err(|message| (key.to_owned(), message))?;
        }
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{key}[{index}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (child, item) in table.iter_mut() {
                interpolate_value(item, &format!("{key}.{child}"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replaces `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
pub fn interpolate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body_and_tail) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let close = body_and_tail
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
        let body = &body_and_tail[..close];
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body, None),
        };
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(format!("`${{{body}}}` is not a valid variable reference"));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                ))
            }
        }
        rest = &body_and_tail[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How much WAL the slot keeps behind walstream's checkpoint, so `reset-lsn` can go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Confirm the checkpoint itself: nothing before it can be replayed.
    #[default]
    None,
    Bytes(u64),
    Time(Duration),
}

impl Retention {
    /// `"10GB"`, `"512MiB"` (a size ends in B) or `"2h"`, `"30min"`, `"7d"`; `"0"` for none.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let invalid = |why: String| {
            format!("`{text}` is neither a size such as \"10GB\" nor a time such as \"2h\" ({why})")
        };
        if text == "0" {
            return Ok(Self::None);
        }
        if text.ends_with(['b', 'B']) {
            let size: bytesize::ByteSize = text.parse().map_err(invalid)?;
            return Ok(if size.0 == 0 {
                Self::None
            } else {
                Self::Bytes(size.0)
            });
        }
        let time = humantime::parse_duration(text).map_err(|e| invalid(e.to_string()))?;
        Ok(if time.is_zero() {
            Self::None
        } else {
            Self::Time(time)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://u@localhost/db"
        [replication]
        tables = ["public.tb_order", "public.tb_order_item"]
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("walstream.toml"), &no_env)
    }

    #[test]
    fn minimal_config_gets_the_seed_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.nats.stream_name, "fraiseql_events");
        assert_eq!(config.nats.subject_prefix, "fraiseql.mutation");
        assert_eq!(config.nats.jetstream.dedup_window_minutes, 5);
        assert_eq!(config.replication.slot, "walstream");
    }

    #[test]
    fn a_relative_checkpoint_lives_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walstream.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.checkpoint.path, dir.path().join("walstream-data"));
        std::fs::write(
            &path,
            format!("{MINIMAL}\n[checkpoint]\npath = \"/var/lib/w\"\n"),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.checkpoint.path, Path::new("/var/lib/w"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MINIMAL}\n[nats.jetstream]\nmax_deliverr = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats.jetstream"), "{err}");
        assert!(err.contains("max_deliverr"), "{err}");
    }

    #[test]
    fn unqualified_tables_are_refused_with_the_fix() {
        let err = parse(
            "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['tb_order']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("public.tb_order"), "{err}");
    }

    #[test]
    fn routes_resolve_unqualified_tables() {
        let config = parse(&format!(
            "{MINIMAL}\n[[routes]]\ntable='tb_order'\nevent='insert'\nsubject='events.order.created'\n"
        ))
        .unwrap();
        assert_eq!(
            config.resolve_table(&config.routes[0].table).unwrap(),
            "public.tb_order"
        );
        let err = parse(&format!(
            "{MINIMAL}\n[[routes]]\ntable='tb_nope'\nevent='INSERT'\nsubject='a.b'\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("routes.table") && err.contains("tb_nope"),
            "{err}"
        );
    }

    #[test]
    fn interpolation() {
        let env = |name: &str| (name == "HOST").then(|| "db.internal".to_string());
        assert_eq!(
            interpolate("pg://${HOST}/x", &env).unwrap(),
            "pg://db.internal/x"
        );
        assert_eq!(interpolate("${PORT:-5432}", &env).unwrap(), "5432");
        assert_eq!(interpolate("cost $$5 $x", &env).unwrap(), "cost $5 $x");
        assert!(interpolate("${MISSING}", &env)
            .unwrap_err()
            .contains("MISSING"));
        assert!(interpolate("${OPEN", &env).is_err());
    }

    #[test]
    fn interpolated_values_may_contain_toml_syntax() {
        let env = |_: &str| Some("p\"w'd".to_string());
        let config = Config::parse(
            "[database]\nurl='postgres://u:${PW}@h/d'\n[replication]\ntables=['public.t']\n",
            Path::new("x"),
            &env,
        )
        .unwrap();
        assert_eq!(config.database.url, "postgres://u:p\"w'd@h/d");
    }

    #[test]
    fn the_container_config_parses_with_its_environment_and_names_what_is_missing() {
        let text = include_str!("../deploy/k8s/walstream.toml");
        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://walstream:pw@postgres:5432/app".to_owned()),
            "NATS_URL" => Some("nats://nats:4222".to_owned()),
            "JWT_SECRET" => Some("s3cret".to_owned()),
            _ => None,
        };
        let path = Path::new("/etc/walstream/walstream.toml");
        let config = Config::parse(text, path, &env).expect("the shipped config is valid");
        assert_eq!(config.http.listen, "0.0.0.0:9187");
        let graphql = config.graphql().expect("a GraphQL section");
        assert_eq!(graphql.listen, "0.0.0.0:8080");
        assert_eq!(
            graphql.schema,
            Path::new("/etc/walstream/schema.graphql"),
            "where deploy/Dockerfile and deploy/k8s put the schema"
        );
        let without_nats = |name: &str| (name != "NATS_URL").then(|| env(name)).flatten();
        let error = Config::parse(text, path, &without_nats)
            .unwrap_err()
            .to_string();
        assert!(error.contains("NATS_URL"), "{error}");
    }

    #[test]
    fn a_url_with_downgradable_tls_or_a_bad_port_is_refused_with_the_reason() {
        let text = MINIMAL.replace(
            "postgres://u@localhost/db",
            "postgres://u@h/d?sslmode=prefer",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("database.url") && err.contains("sslmode=verify-full"),
            "{err}"
        );
        let text = MINIMAL.replace(
            "postgres://u@localhost/db",
            "postgres://u@h/d?sslmode=verify-full",
        );
        assert!(parse(&text).is_ok());
        let text = MINIMAL.replace("postgres://u@localhost/db", "postgres://u@h:notaport/d");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("database.url"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[replication]\nslot='My-Slot'", "replication.slot"),
            ("[nats]\nsubject_prefix='a..b'", "nats.subject_prefix"),
            ("[nats.jetstream]\nreplicas=7", "nats.jetstream.replicas"),
            ("[nats.jetstream]\nstorage='disk'", "nats.jetstream.storage"),
            ("[http]\nlisten='nowhere'", "http.listen"),
        ];
        for (extra, key) in cases {
            let text = MINIMAL.replace("[replication]", &format!("{extra}\n[replication]"));
            let text = if extra.starts_with("[replication]") {
                format!("[database]\nurl='postgres://localhost/db'\n{extra}\ntables=['public.t']\n")
            } else {
                text
            };
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn retention_reads_sizes_and_times() {
        assert_eq!(Retention::parse("0"), Ok(Retention::None));
        assert_eq!(
            Retention::parse("10GB"),
            Ok(Retention::Bytes(10_000_000_000))
        );
        assert_eq!(Retention::parse("1 MiB"), Ok(Retention::Bytes(1 << 20)));
        assert_eq!(
            Retention::parse("2h"),
            Ok(Retention::Time(Duration::from_secs(7200)))
        );
        let error = Retention::parse("lots").unwrap_err();
        assert!(
            error.contains("\"10GB\"") && error.contains("\"2h\""),
            "{error}"
        );
    }

    #[test]
    fn table_filters_refine_watched_tables() {
        let with = |table: &str| parse(&format!("{MINIMAL}\n[[replication.table]]\n{table}\n"));
        let config =
            with("name = \"tb_order\"\ncolumns = [\"id\", \"total\"]\nwhere = \"total > 0\"")
                .expect("a valid filter");
        let filter = config
            .table_filter("public.tb_order")
            .expect("found by its full name");
        assert_eq!(
            filter.columns.as_deref(),
            Some(&["id".to_owned(), "total".to_owned()][..])
        );
        assert_eq!(filter.filter.as_deref(), Some("total > 0"));
        assert!(config.table_filter("public.tb_order_item").is_none());
        for (table, complaint) in [
            (
                "name = \"public.nope\"\ncolumns = [\"id\"]",
                "not in replication.tables",
            ),
            ("name = \"tb_order\"", "give `columns`, `where`, or both"),
            ("name = \"tb_order\"\ncolumns = []", "`columns` is empty"),
            (
                "name = \"tb_order\"\ncolumns = [\"id\", \"id\"]",
                "listed twice",
            ),
            ("name = \"tb_order\"\nwhere = \" \"", "`where` is empty"),
            ("name = \"tb_order\"\nrows = \"x\"", "rows"),
        ] {
            let error = with(table).expect_err(table).to_string();
            assert!(error.contains(complaint), "{table}: {error}");
        }
    }
}
