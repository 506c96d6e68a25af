//! The normal (non-replication) PostgreSQL connection: slot and publication management, catalog
//! lookups, heartbeats.

use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::{Client, NoTls};

use crate::config::{parse_qualified_table, Config};
use crate::lsn::{parse_lsn, Lsn};
use crate::secrets::redact_urls;
use crate::tls::PostgresTls;

/// `database.url` as tokio-postgres' config, TLS required when the URL asks for it, and the
/// TLS settings to connect with.
pub fn parse_url(url: &str) -> anyhow::Result<(tokio_postgres::Config, PostgresTls)> {
    let (plain, tls) =
        crate::tls::split_url(url).map_err(|e| anyhow::anyhow!("database.url: {e}"))?;
    let mut config: tokio_postgres::Config = plain.parse().map_err(|e| {
        anyhow::anyhow!(
            "database.url `{}` is not a PostgreSQL URL: {e}",
            redact_urls(url)
        )
    })?;
    config.ssl_mode(if tls.enabled() {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    // Several hosts are a primary and its standbys: walstream needs the one that writes
    // (a slot is streamed, heartbeats are written, on the primary only).
    if config.get_hosts().len() > 1 {
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    Ok((config, tls))
}

/// How long a connection may take to be ready when `database.url` sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and drives the connection in the background. `connect_timeout` bounds the whole
/// handshake, not only the TCP connect as in tokio-postgres: a server that accepts and then
/// never answers must not hang walstream.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (config, tls) = parse_url(url)?;
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let failed = |e: tokio_postgres::Error| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {}: {}",
            redact_urls(url),
            error_chain(&e)
        )
    };
    let handshake = async {
        if tls.enabled() {
            let (client, connection) = config.connect(tls.connector()?).await.map_err(failed)?;
            tokio::spawn(drive(connection));
            Ok(client)
        } else {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
    };
    tokio::time::timeout(limit, handshake).await.map_err(|_| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {}: no answer within {limit:?} (connect_timeout \
             in database.url changes the limit)",
            redact_urls(url)
        )
    })?
}

/// tokio-postgres says only "db error" or "error performing TLS handshake"; the server's
/// message or the certificate problem is in the error's sources.
fn error_chain(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!("PostgreSQL control connection ended: {error}");
    }
}

/// A row of `pg_replication_slots`, read whole (`to_jsonb`), so the columns each PostgreSQL
/// version adds are there when the server has them.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    /// WAL the server keeps for the slot: current WAL LSN minus `restart_lsn`.
    pub wal_retained_bytes: Option<i64>,
    /// 17+: the slot follows a failover to a standby that synchronizes slots.
    pub failover: Option<bool>,
    /// 17+: on a standby, a slot synchronized from the primary.
    pub synced: Option<bool>,
    /// 17+: since when no walsender streams the slot.
    pub inactive_since: Option<String>,
    /// 17+: why the slot was invalidated (`wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`; 18: `idle_timeout`).
    pub invalidation_reason: Option<String>,
}

impl SlotInfo {
    /// Why the slot can no longer be streamed, and how to recover; `None` while it can.
    pub fn invalidated(&self, name: &str) -> Option<String> {
        let lost = self.wal_status.as_deref() == Some("lost");
        let reason = self.invalidation_reason.as_deref();
        if !lost && reason.is_none() {
            return None;
        }
        let why = match reason {
            Some("idle_timeout") => {
                "no walsender used it for longer than idle_replication_slot_timeout \
                 (PostgreSQL 18); raise or disable that setting, or keep walstream running"
            }
            Some("rows_removed") => {
                "catalog rows it needed were removed (vacuum on the primary; on a standby, \
                 hot_standby_feedback off)"
            }
            Some("wal_level_insufficient") => "wal_level was lowered below logical",
            _ => "PostgreSQL removed WAL it still needed (max_slot_wal_keep_size)",
        };
        let shown = match (lost, reason) {
            (true, Some(reason)) => format!("wal_status = lost, invalidation_reason = {reason}"),
            (true, None) => "wal_status = lost".to_owned(),
            (false, Some(reason)) => format!("invalidation_reason = {reason}"),
            (false, None) => unreachable!("returned above"),
        };
        Some(format!(
            "replication slot {name} was invalidated ({shown}): {why}. Changes were lost for it; \
             drop and recreate the slot with `walstream setup`, then re-emit the tables' current \
             rows with `walstream backfill --table …` (the changes in between are gone, their \
             result is in the tables)"
        ))
    }
}

pub async fn slot_info(client: &Client, slot: &str) -> anyhow::Result<Option<SlotInfo>> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(s)::text, (pg_current_wal_lsn() - s.restart_lsn)::int8 \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let text: String = row.get(0);
    let columns: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("reading pg_replication_slots: {e}"))?;
    let text = |name: &str| columns[name].as_str().map(str::to_owned);
    let flag = |name: &str| columns[name].as_bool();
    let lsn = |name: &str| text(name).map(|t| parse_lsn(&t)).transpose();
    Ok(Some(SlotInfo {
        plugin: text("plugin"),
        slot_type: text("slot_type").unwrap_or_default(),
        database: text("database"),
        active: flag("active").unwrap_or(false),
        active_pid: columns["active_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok()),
        confirmed_flush_lsn: lsn("confirmed_flush_lsn").map_err(anyhow::Error::msg)?,
        restart_lsn: lsn("restart_lsn").map_err(anyhow::Error::msg)?,
        wal_status: text("wal_status"),
        wal_retained_bytes: row.get(1),
        failover: flag("failover"),
        synced: flag("synced"),
        inactive_since: text("inactive_since"),
        invalidation_reason: text("invalidation_reason"),
    }))
}

/// Seconds since PostgreSQL last heard from the walsender streaming `slot`, or `None` when no
/// walsender streams it. Our client replies every status interval, so a large value means the
/// link is dead even when nothing arrives because the database is quiet.
pub async fn seconds_since_reply(client: &Client, slot: &str) -> anyhow::Result<Option<f64>> {
    let row = client
        .query_opt(
            "SELECT extract(epoch FROM now() - r.reply_time)::float8
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|row| row.get::<_, Option<f64>>(0)))
}

/// Tables of a publication, schema-qualified, or `None` when it does not exist.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(Some(rows.iter().map(|row| row.get(0)).collect()))
}

/// Quotes `schema.table` as a SQL identifier pair.
pub fn quote_table(qualified: &str) -> String {
    match parse_qualified_table(qualified) {
        Ok((schema, table)) => {
            format!("{}.{}", escape_identifier(schema), escape_identifier(table))
        }
        Err(_) => escape_identifier(qualified),
    }
}

/// The SQL that creates the publication and the slot, as `setup` runs it and prints it.
/// A table as a publication names it: `"public"."t" ("a", "b") WHERE (a > 0)`, with the column
/// list and row filter `[[replication.table]]` gives it.
pub fn publication_table_spec(config: &Config, table: &str) -> String {
    let mut spec = quote_table(table);
    if let Some(filter) = config.table_filter(table) {
        if let Some(columns) = &filter.columns {
            let columns: Vec<String> = columns.iter().map(|c| escape_identifier(c)).collect();
            spec.push_str(&format!(" ({})", columns.join(", ")));
        }
        if let Some(condition) = &filter.filter {
            spec.push_str(&format!(" WHERE ({condition})"));
        }
    }
    spec
}

/// What a publication publishes of one table (PostgreSQL 15+ can publish less than all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    /// The published columns; every column when `None` (no column list, or before 15).
    pub columns: Option<Vec<String>>,
    /// The row filter as PostgreSQL deparsed it (`(country <> 'internal'::text)`).
    pub row_filter: Option<String>,
}

/// What `publication` publishes of `table`, or `None` when it does not include the table.
pub async fn published_table(
    client: &Client,
    publication: &str,
    table: &str,
) -> anyhow::Result<Option<PublishedTable>> {
    let (schema, name) = crate::config::parse_qualified_table(table).map_err(anyhow::Error::msg)?;
    // Whole rows: `attnames` and `rowfilter` exist from PostgreSQL 15 on.
    let row = client
        .query_opt(
            "SELECT to_jsonb(p)::text FROM pg_publication_tables p
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &schema, &name],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading publication {publication}: {}", db_error(&e)))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let text: String = row.get(0);
    let columns: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("reading pg_publication_tables: {e}"))?;
    Ok(Some(PublishedTable {
        columns: columns["attnames"].as_array().map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        }),
        row_filter: columns["rowfilter"].as_str().map(str::to_owned),
    }))
}

/// Where the live publication publishes other columns or rows than `[[replication.table]]`
/// says, one sentence each, with the statement that makes them agree.
pub async fn publication_differences(
    client: &Client,
    config: &Config,
) -> anyhow::Result<Vec<String>> {
    let publication = &config.replication.publication;
    let mut differences = Vec::new();
    for filter in &config.replication.table_filters {
        let Ok(table) = config.resolve_table(&filter.name) else {
            continue;
        };
        let Some(live) = published_table(client, publication, &table).await? else {
            continue;
        };
        let fix = format!(
            "ALTER PUBLICATION {} SET TABLE … {} (list every table of the publication)",
            escape_identifier(publication),
            publication_table_spec(config, &table)
        );
        if let Some(wanted) = &filter.columns {
            let mut wanted = wanted.clone();
            wanted.sort();
            let mut published = live.columns.clone().unwrap_or_default();
            published.sort();
            if live.columns.is_none() || wanted != published {
                differences.push(format!(
                    "publication {publication} publishes columns [{}] of {table}, where \
                     [[replication.table]] says [{}]: {fix}",
                    live.columns.map_or("all".into(), |c| c.join(", ")),
                    wanted.join(", ")
                ));
            }
        }
        match (&filter.filter, &live.row_filter) {
            (Some(wanted), None) => differences.push(format!(
                "publication {publication} publishes every row of {table}, where \
                 [[replication.table]] says `where = \"{wanted}\"`: {fix}"
            )),
            (None, Some(live)) => differences.push(format!(
                "publication {publication} filters the rows of {table} ({live}), where \
                 [[replication.table]] gives no `where`: {fix}"
            )),
            _ => {}
        }
    }
    Ok(differences)
}

/// PostgreSQL's `server_version_num` (`150007` for 15.7).
/// `170004` as `17.4`.
pub fn version_text(version_num: i32) -> String {
    format!("{}.{}", version_num / 10_000, version_num % 10_000)
}

pub async fn server_version(client: &Client) -> anyhow::Result<i32> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    Ok(row.get(0))
}

pub fn setup_sql(config: &Config) -> Vec<String> {
    let repl = &config.replication;
    let tables: Vec<String> = repl
        .tables
        .iter()
        .map(|t| publication_table_spec(config, t))
        .collect();
    vec![
        format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            escape_identifier(&repl.publication),
            tables.join(", ")
        ),
        format!(
            "SELECT pg_create_logical_replication_slot({}, 'pgoutput'{})",
            escape_literal(&repl.slot),
            if repl.failover {
                ", failover => true"
            } else {
                ""
            }
        ),
    ]
}

/// The first PostgreSQL version whose slots can follow a failover (`server_version_num`).
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// What a primary and its standbys need so that walstream's failover slot follows a
/// promotion, as SQL and postgresql.conf lines for a DBA (comments where a value is theirs).
pub fn failover_settings(config: &Config) -> String {
    let database = parse_url(&config.database.url)
        .ok()
        .and_then(|(url, _)| url.get_dbname().map(str::to_owned))
        .unwrap_or_else(|| "<database>".into());
    format!(
        "-- Failover (replication.failover = true, PostgreSQL 17+): the slot is created with\n\
         -- failover => true, and standbys that synchronize slots keep it in step, so walstream\n\
         -- goes on from a promoted standby. database.url names every host, e.g.\n\
         --   postgres://walstream@primary:5432,standby:5432/{database}\n\
         --\n\
         -- On the primary: a physical slot per standby, and logical walsenders held back until\n\
         -- the standbys have the WAL (without it walstream can publish changes a promoted\n\
         -- standby never got: phantom events, which walstream detects and marks).\n\
         SELECT pg_create_physical_replication_slot('standby1');\n\
         ALTER SYSTEM SET synchronized_standby_slots = 'standby1';\n\
         SELECT pg_reload_conf();\n\
         --\n\
         -- On each standby, in postgresql.conf (then reload). primary_conninfo must name the\n\
         -- database: the slot synchronization worker connects to it.\n\
         --   primary_conninfo = 'host=<primary> port=5432 user=<replication role> dbname={database}'\n\
         --   primary_slot_name = 'standby1'\n\
         --   hot_standby_feedback = on\n\
         --   sync_replication_slots = on\n\
         -- Do not set synchronized_standby_slots on a standby: once promoted it would wait for\n\
         -- slots it does not have.\n"
    )
}

/// SQL for a DBA: a least-privilege role that can stream the slot and nothing else.
pub fn role_sql(config: &Config, role: &str) -> String {
    let repl = &config.replication;
    let role_ident = escape_identifier(role);
    let schemas: std::collections::BTreeSet<&str> = repl
        .tables
        .iter()
        .filter_map(|t| parse_qualified_table(t).ok().map(|(schema, _)| schema))
        .collect();
    let mut sql = format!(
        "-- A login role that can stream the slot: REPLICATION lets it open replication\n\
         -- connections; it owns nothing and can write nothing.\n\
         CREATE ROLE {role_ident} WITH LOGIN REPLICATION PASSWORD 'change-me';\n\
         -- Catalog lookups (slot state, primary keys) need only the default catalog access.\n\
         -- Heartbeats write a tiny WAL message so an idle slot keeps advancing:\n\
         GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {role_ident};\n\
         -- Backfill writes its chunks the same way, as bytes:\n\
         GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) TO {role_ident};\n"
    );
    for schema in schemas {
        sql.push_str(&format!(
            "GRANT USAGE ON SCHEMA {} TO {role_ident};\n",
            escape_identifier(schema)
        ));
    }
    sql.push_str(&format!(
        "-- Backfill (walstream backfill) reads the watched tables:\nGRANT SELECT ON {} TO {role_ident};\n",
        repl.tables.iter().map(|t| quote_table(t)).collect::<Vec<_>>().join(", ")
    ));
    sql
}

/// Creates what is missing (publication, slot), as configured. Idempotent.
pub async fn ensure_publication_and_slot(
    client: &Client,
    config: &Config,
    create_publication: bool,
    create_slot: bool,
) -> anyhow::Result<()> {
    let repl = &config.replication;
    let version = server_version(client).await?;
    if repl.failover && version < FAILOVER_SLOTS_SINCE {
        anyhow::bail!(
            "replication.failover = true needs PostgreSQL 17 or later (failover slots); this \
             server is {}. Set replication.failover = false: after a failover, recreate the \
             slot on the new primary and re-emit the tables with `walstream backfill`",
            version_text(version)
        );
    }
    if !repl.table_filters.is_empty() && version < 150_000 {
        anyhow::bail!(
            "[[replication.table]] column lists and row filters need PostgreSQL 15 or later; \
             this server is older. Remove them, or publish every column and row"
        );
    }
    let statements = setup_sql(config);
    match publication_tables(client, &repl.publication).await? {
        None if create_publication => {
            client.batch_execute(&statements[0]).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot create publication {}: {}; run `walstream setup --print-sql` and have \
                     a table owner run it",
                    repl.publication,
                    db_error(&e)
                )
            })?;
            tracing::info!(publication = %repl.publication, "created the publication");
        }
        None => anyhow::bail!(
            "publication {} does not exist; create it (walstream setup --print-sql shows how) or \
             set replication.create_publication = true",
            repl.publication
        ),
        Some(existing) => {
            let missing: Vec<&String> = repl
                .tables
                .iter()
                .filter(|t| !existing.contains(t))
                .collect();
            if !missing.is_empty() && create_publication {
                let add = format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    escape_identifier(&repl.publication),
                    missing
                        .iter()
                        .map(|t| publication_table_spec(config, t))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                client.batch_execute(&add).await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot add tables to publication {}: {}",
                        repl.publication,
                        db_error(&e)
                    )
                })?;
                tracing::info!(publication = %repl.publication, ?missing, "added tables to the publication");
            } else if !missing.is_empty() {
                anyhow::bail!(
                    "publication {} does not include {}; add them (ALTER PUBLICATION {} ADD TABLE …) \
                     or set replication.create_publication = true",
                    repl.publication,
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    repl.publication
                );
            }
        }
    }
    // A column left out of the config's list must never be published: walstream does not
    // stream from a publication that says otherwise.
    let differences = publication_differences(client, config).await?;
    if !differences.is_empty() {
        anyhow::bail!("{}", differences.join("; "));
    }
    match slot_info(client, &repl.slot).await? {
        None if create_slot => {
            client.batch_execute(&statements[1]).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot create replication slot {}: {}",
                    repl.slot,
                    db_error(&e)
                )
            })?;
            tracing::info!(slot = %repl.slot, "created the replication slot");
        }
        None => anyhow::bail!(
            "replication slot {} does not exist; create it (walstream setup) or set \
             replication.create_slot = true",
            repl.slot
        ),
        Some(slot) if slot.plugin.as_deref() != Some("pgoutput") => anyhow::bail!(
            "replication slot {} uses plugin {:?}, not pgoutput; drop it or choose another \
             replication.slot",
            repl.slot,
            slot.plugin.unwrap_or_default()
        ),
        Some(_) => {}
    }
    Ok(())
}

/// The server's message for a database error, without the driver's wrapping.
pub fn db_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.hint() {
            Some(hint) => format!("{} (hint: {hint})", db.message()),
            None => db.message().to_owned(),
        },
        None => error.to_string(),
    }
}

/// Writes a heartbeat message into the WAL so a slot on a quiet database keeps advancing.
pub async fn emit_heartbeat(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, 'walstream.heartbeat', now()::text)",
            &[],
        )
        .await
        .map(|_| ())
}

/// Prefix of the heartbeat messages walstream writes (and does not publish).
pub const HEARTBEAT_PREFIX: &str = "walstream.heartbeat";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(socket);
        });
        let url = format!("postgres://walstream@127.0.0.1:{port}/db?connect_timeout=1");
        let started = std::time::Instant::now();
        let error = connect(&url).await.expect_err("no server answered");
        assert!(started.elapsed() < Duration::from_secs(5));
        let message = error.to_string();
        assert!(message.contains("no answer within 1s"), "{message}");
        assert!(message.contains("connect_timeout"), "{message}");
        silent.abort();
    }

    #[test]
    fn the_publication_names_column_lists_and_row_filters() {
        let config = Config::parse(
            "[database]\nurl = \"postgres://u@localhost/db\"\n[replication]\n\
             tables = [\"public.tb_order\", \"public.tb_customer\"]\n\
             [[replication.table]]\nname = \"tb_customer\"\ncolumns = [\"id\", \"Country\"]\n\
             where = \"country <> 'internal'\"\n",
            std::path::Path::new("walstream.toml"),
            &|_| None,
        )
        .expect("config");
        assert_eq!(
            setup_sql(&config)[0],
            "CREATE PUBLICATION \"walstream\" FOR TABLE \"public\".\"tb_order\", \
             \"public\".\"tb_customer\" (\"id\", \"Country\") WHERE (country <> 'internal')"
        );
    }
}
