//! `walstream check`: preflight of PostgreSQL, NATS and the checkpoint directory, one line per
//! check, each failure saying what to fix.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{parse_qualified_table, Config};
use crate::metrics::Metrics;
use crate::nats;
use crate::pipeline::checkpoint::Checkpoint;
use crate::pipeline::history;
use crate::pipeline::sink::{PublishMode, StreamFacts};
use crate::postgres::{self, db_error};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    /// Works, but the operator should know.
    Warn,
    Fail,
}

/// Collected check results.
#[derive(Default)]
pub struct Report {
    lines: Vec<(Outcome, String)>,
}

impl Report {
    fn pass(&mut self, message: impl Into<String>) {
        self.lines.push((Outcome::Pass, message.into()));
    }

    fn warn(&mut self, message: impl Into<String>) {
        self.lines.push((Outcome::Warn, message.into()));
    }

    fn fail(&mut self, message: impl Into<String>) {
        self.lines.push((Outcome::Fail, message.into()));
    }

    fn check(&mut self, ok: bool, pass: impl Into<String>, fail: impl Into<String>) {
        if ok {
            self.pass(pass)
        } else {
            self.fail(fail)
        }
    }

    pub fn failures(&self) -> usize {
        self.lines
            .iter()
            .filter(|(outcome, _)| *outcome == Outcome::Fail)
            .count()
    }

    pub fn print(&self) {
        for (outcome, line) in &self.lines {
            let label = match outcome {
                Outcome::Pass => "ok  ",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
            };
            println!("{label} {line}");
        }
    }
}

pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    match postgres::connect(&config.database.url).await {
        Ok(client) => {
            if let Err(error) = check_postgres(&client, config, &mut report).await {
                report.fail(format!("PostgreSQL check could not complete: {error:#}"));
            }
        }
        Err(error) => report.fail(format!("{error:#}")),
    }
    check_nats(config, &mut report).await;
    check_checkpoint(config, &mut report);
    report
}

async fn check_postgres(
    client: &Client,
    config: &Config,
    report: &mut Report,
) -> anyhow::Result<()> {
    let repl = &config.replication;
    report.pass("PostgreSQL reachable");
    let setting = |name: &'static str| async move {
        client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map(|row| row.get::<_, String>(0))
    };
    let wal_level = setting("wal_level").await?;
    report.check(
        wal_level == "logical",
        "wal_level is logical",
        format!(
            "wal_level is {wal_level}, not logical: set wal_level = logical in postgresql.conf \
             (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        ),
    );
    let role = client
        .query_one(
            "SELECT rolreplication, rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (can_replicate, superuser, user): (bool, bool, String) =
        (role.get(0), role.get(1), role.get(2));
    report.check(
        can_replicate || superuser,
        format!("role {user} may open replication connections"),
        format!("role {user} lacks the REPLICATION attribute: ALTER ROLE {user} WITH REPLICATION"),
    );

    let slot = postgres::slot_info(client, &repl.slot).await?;
    let slots_used: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    let max_slots: i64 = setting("max_replication_slots").await?.parse().unwrap_or(0);
    if slot.is_none() {
        report.check(
            slots_used < max_slots,
            format!("a replication slot is free ({slots_used} of {max_slots} used)"),
            format!(
                "all {max_slots} replication slots are used: raise max_replication_slots or drop \
                 an unused slot"
            ),
        );
    }
    let senders_used: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await?
        .get(0);
    let max_senders: i64 = setting("max_wal_senders").await?.parse().unwrap_or(0);
    report.check(
        senders_used < max_senders,
        format!("a WAL sender is free ({senders_used} of {max_senders} used)"),
        format!("all {max_senders} WAL senders are busy: raise max_wal_senders"),
    );

    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    if repl.failover {
        let slot_failover = slot.as_ref().map(|s| s.failover);
        check_failover(client, config, slot_failover, report).await?;
    }
    match slot {
        None if repl.create_slot => report.pass(format!(
            "slot {} does not exist yet; walstream stream will create it",
            repl.slot
        )),
        None => report.fail(format!(
            "slot {} does not exist: run walstream setup, or set replication.create_slot = true",
            repl.slot
        )),
        Some(slot) => {
            let plugin = slot.plugin.clone().unwrap_or_default();
            if slot.slot_type != "logical" || plugin != "pgoutput" {
                report.fail(format!(
                    "slot {} is a {} slot with plugin {plugin:?}, not a logical pgoutput slot: \
                     drop it or choose another replication.slot",
                    repl.slot, slot.slot_type
                ));
            } else if slot.database.as_deref() != Some(database.as_str()) {
                report.fail(format!(
                    "slot {} belongs to database {:?}, not {database:?}: choose another \
                     replication.slot",
                    repl.slot,
                    slot.database.unwrap_or_default()
                ));
            } else if let Some(why) = slot.invalidated(&repl.slot) {
                report.fail(why);
            } else if let Some(pid) = slot.active_pid.filter(|_| slot.active) {
                report.fail(format!(
                    "slot {} is in use by another process (PID {pid}); stop the other consumer \
                     first (SELECT pg_terminate_backend({pid}) if it is stale)",
                    repl.slot
                ));
            } else {
                report.pass(format!(
                    "slot {} is a pgoutput slot of {database}, not in use",
                    repl.slot
                ));
            }
        }
    }

    match postgres::publication_tables(client, &repl.publication).await? {
        None if repl.create_publication => report.pass(format!(
            "publication {} does not exist yet; walstream stream will create it",
            repl.publication
        )),
        None => report.fail(format!(
            "publication {} does not exist: run walstream setup, or set \
             replication.create_publication = true",
            repl.publication
        )),
        Some(tables) => {
            for table in &repl.tables {
                if tables.contains(table) {
                    report.pass(format!("publication {} includes {table}", repl.publication));
                } else if repl.create_publication {
                    report.pass(format!(
                        "publication {} lacks {table}; walstream stream will add it",
                        repl.publication
                    ));
                } else {
                    report.fail(format!(
                        "publication {} does not include {table}: ALTER PUBLICATION {} ADD TABLE {}",
                        repl.publication,
                        repl.publication,
                        postgres::publication_table_spec(config, table)
                    ));
                }
            }
            check_table_filters(client, config, report).await?;
        }
    }
    for table in &repl.tables {
        check_table(client, table, report).await?;
    }
    Ok(())
}

/// What a failover needs that the primary shows: a PostgreSQL with failover slots, the slot
/// made one, `synchronized_standby_slots`, and standbys streaming. `slot_failover` is the slot's
/// flag (`None` when there is no slot yet).
async fn check_failover(
    client: &Client,
    config: &Config,
    slot_failover: Option<Option<bool>>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let slot = &config.replication.slot;
    let version = postgres::server_version(client).await?;
    if version < postgres::FAILOVER_SLOTS_SINCE {
        report.fail(format!(
            "replication.failover = true needs PostgreSQL 17 or later; this server is {}: set \
             replication.failover = false",
            postgres::version_text(version)
        ));
        return Ok(());
    }
    match slot_failover {
        None => report.pass(format!(
            "slot {slot} will be created as a failover slot (replication.failover)"
        )),
        Some(Some(true)) => report.pass(format!("slot {slot} is a failover slot")),
        Some(_) => report.warn(format!(
            "slot {slot} is not a failover slot yet: walstream makes it one when it starts \
             (ALTER_REPLICATION_SLOT {slot} (FAILOVER true)); until then it would not follow a \
             promotion"
        )),
    }
    let standby_slots: String = client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await?
        .get(0);
    if standby_slots.trim().is_empty() {
        report.warn(
            "synchronized_standby_slots is empty: walstream can receive and publish changes \
             before a standby has them, and after a failover to that standby those events \
             never happened for the database (walstream marks them void on <prefix>._failover). \
             ALTER SYSTEM SET synchronized_standby_slots = '<each standby's physical slot>' \
             (walstream setup --print-sql shows the settings)",
        );
    } else {
        let rows = client
            .query(
                "SELECT name, s.active FROM unnest(string_to_array($1, ',')) AS n(raw), \
                 LATERAL (SELECT trim(n.raw) AS name) t \
                 LEFT JOIN pg_replication_slots s ON s.slot_name = t.name AND s.slot_type = 'physical'",
                &[&standby_slots],
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", db_error(&e)))?;
        for row in rows {
            let (name, active): (String, Option<bool>) = (row.get(0), row.get(1));
            match active {
                Some(true) => report.pass(format!(
                    "synchronized_standby_slots: {name} is a physical slot a standby streams"
                )),
                Some(false) => report.warn(format!(
                    "synchronized_standby_slots: no standby streams physical slot {name}; \
                     walstream receives nothing until one does"
                )),
                None => report.fail(format!(
                    "synchronized_standby_slots names {name}, which is no physical slot here: \
                     walstream would receive nothing; create it or fix the setting"
                )),
            }
        }
    }
    let standbys = client
        .query(
            "SELECT coalesce(r.application_name, ''), coalesce(r.client_addr::text, 'local'), \
             coalesce(r.state, ''), coalesce(r.sync_state, '') \
             FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE s.slot_type IS DISTINCT FROM 'logical'",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", db_error(&e)))?;
    if standbys.is_empty() {
        report.warn(
            "no standby streams from this primary (pg_stat_replication): a failover has nowhere \
             to go yet",
        );
    }
    for row in standbys {
        let (name, address, state, sync): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        report.pass(format!(
            "standby {name} ({address}) is {state}, {sync}; it must run with \
             sync_replication_slots = on and hot_standby_feedback = on to carry the slot"
        ));
    }
    Ok(())
}

async fn check_table(client: &Client, table: &str, report: &mut Report) -> anyhow::Result<()> {
    let (schema, name) = parse_qualified_table(table).map_err(anyhow::Error::msg)?;
    let row = client
        .query_opt(
            "SELECT c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    has_table_privilege(c.oid, 'SELECT'),
                    pg_has_role(c.relowner, 'USAGE'),
                    a.attnum IS NOT NULL,
                    c.relreplident = 'f' OR EXISTS (
                        SELECT 1 FROM pg_index i
                        WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])
                          AND ((c.relreplident = 'd' AND i.indisprimary)
                               OR (c.relreplident = 'i' AND i.indisreplident)))
             FROM pg_class c
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'id'
                  AND a.atttypid = 'uuid'::regtype AND NOT a.attisdropped JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", db_error(&e)))?;
    let Some(row) = row else {
        report.fail(format!("table {table} does not exist (or is not a table)"));
        return Ok(());
    };
    let (identity, has_pk, can_select): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let (has_uuid_id, uuid_id_in_identity): (bool, bool) = (row.get(4), row.get(5));
    let quoted = postgres::quote_table(table);
    match (identity.as_str(), has_pk) {
        ("n", _) => report.fail(format!(
            "{table} has REPLICA IDENTITY NOTHING: its UPDATEs and DELETEs fail once published. \
             ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT (with a primary key) or FULL"
        )),
        ("d", false) => report.fail(format!(
            "{table} has no primary key and REPLICA IDENTITY DEFAULT: its UPDATEs and DELETEs \
             fail once published. Add a primary key, or ALTER TABLE {quoted} REPLICA IDENTITY FULL"
        )),
        _ => report.pass(format!("{table} has a usable replica identity")),
    }
    if has_uuid_id && !uuid_id_in_identity {
        report.warn(format!(
            "{table}'s DELETE events carry an entity_id derived from its key, not its uuid \
             column id, which its replica identity leaves out: for consumers keyed on \
             entity_id (FraiseQL's observers), ALTER TABLE {quoted} REPLICA IDENTITY USING \
             INDEX <a unique index on id>, or FULL"
        ));
    }
    report.check(
        can_select,
        format!("may read {table}"),
        format!(
            "cannot SELECT from {table} (needed by backfill): GRANT SELECT ON {quoted} TO <role>"
        ),
    );
    Ok(())
}

/// What to look at when walstream cannot connect to NATS, from what the connection said.
fn nats_hint(error: &str) -> &'static str {
    let error = error.to_ascii_lowercase();
    if error.contains("certificate") || error.contains("alert") || error.contains("tls") {
        "the TLS handshake failed: check nats.tls_ca_file, and nats.tls_client_cert and \
         nats.tls_client_key if the server verifies clients"
    } else if error.contains("authorization") || error.contains("authentication") {
        "the server refused walstream's credentials: check nats.credentials_file, \
         nats.nkey_seed or nats.user and nats.password"
    } else {
        "is nats-server running?"
    }
}

/// Whether the live publication publishes the columns and rows `[[replication.table]]` says.
async fn check_table_filters(
    client: &Client,
    config: &Config,
    report: &mut Report,
) -> anyhow::Result<()> {
    let filters = &config.replication.table_filters;
    if filters.is_empty() {
        return Ok(());
    }
    if postgres::server_version(client).await? < 150_000 {
        report.fail(
            "[[replication.table]] column lists and row filters need PostgreSQL 15 or later; \
             this server is older",
        );
        return Ok(());
    }
    let differences = postgres::publication_differences(client, config).await?;
    if differences.is_empty() {
        report.pass(format!(
            "publication {} publishes the columns and rows [[replication.table]] gives for {} \
             table(s)",
            config.replication.publication,
            filters.len()
        ));
    }
    for difference in differences {
        report.fail(difference);
    }
    Ok(())
}

async fn check_nats(config: &Config, report: &mut Report) {
    let client = match nats::connect(&config.nats, Arc::new(Metrics::new()), Duration::ZERO).await {
        Ok(client) => client,
        Err(error) => {
            let text = format!("{error:#}");
            let hint = nats_hint(&text);
            report.fail(format!("{text}; {hint}"));
            return;
        }
    };
    report.pass("NATS reachable");
    match nats::server_features(&client).await {
        Ok(features) => report.pass(format!("JetStream enabled ({features})")),
        Err(error) => {
            return report.fail(format!(
                "JetStream not available ({error}): start nats-server with -js (jetstream enabled)"
            ))
        }
    }
    check_publish_mode(config, &client.server_info().version, report);
    check_stream(&async_nats::jetstream::new(client), config, report).await;
}

/// How walstream will publish to this server: the mode `stream` logs at start.
fn check_publish_mode(config: &Config, version: &str, report: &mut Report) {
    let replicas = config.nats.jetstream.replicas;
    // The stream's batch settings are walstream's to turn on at start.
    let facts = StreamFacts {
        replicas,
        server_version: version,
        atomic_allowed: true,
        batched_allowed: true,
    };
    match PublishMode::for_stream(facts, &config.nats) {
        Ok(mode) => report.pass(format!(
            "publishing: {} ({replicas} replica(s), nats-server {version})",
            mode.name()
        )),
        Err(error) => report.fail(error.to_string()),
    }
}

/// What the stream's end shows: walstream's last event, and other clients' messages after it.
async fn check_stream(js: &async_nats::jetstream::Context, config: &Config, report: &mut Report) {
    let name = &config.nats.stream_name;
    match nats::existing_stream(js, name).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return report.pass(format!(
                "stream {name} does not exist yet; walstream creates it at its first start"
            ))
        }
        Err(error) => return report.fail(format!("{error:#}")),
    }
    let slot = &config.replication.slot;
    let tail = match history::read_tail(js, name, slot, history::REPORT_SEARCH_LIMIT).await {
        Ok(tail) => tail,
        Err(error) => return report.fail(format!("cannot read stream {name}: {error:#}")),
    };
    let others = match (&tail.own, tail.search_cut_short) {
        (_, true) => format!(
            "none of its last {} messages is walstream's",
            history::REPORT_SEARCH_LIMIT
        ),
        (Some(own), false) if tail.others_after > 0 => format!(
            "{} messages after walstream's last event (sequence {}) were published by another \
             client",
            tail.others_after, own.sequence
        ),
        (None, false) if tail.others_after > 0 => format!(
            "its {} messages were published by another client",
            tail.others_after
        ),
        _ => {
            return report.pass(format!(
                "stream {name} ready (last sequence {})",
                tail.sequence
            ))
        }
    };
    report.warn(format!(
        "stream {name}: {others}. walstream keeps its own events exactly once and in WAL order \
         beside them (README: Other publishers); consumers tell them apart by Nats-Msg-Id \
         ({slot}:…). To keep the stream walstream's alone, point other clients at another stream"
    ));
}

fn check_checkpoint(config: &Config, report: &mut Report) {
    let path = &config.checkpoint.path;
    match Checkpoint::open(path) {
        Ok(checkpoint) => match checkpoint.confirmed_lsn() {
            Ok(Some(lsn)) => report.pass(format!("checkpoint at {} holds {lsn}", path.display())),
            Ok(None) => report.pass(format!(
                "checkpoint at {} is usable (empty)",
                path.display()
            )),
            Err(error) => report.fail(error.to_string()),
        },
        Err(error) => report.fail(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::nats_hint;

    #[test]
    fn a_nats_connect_failure_points_at_what_to_check() {
        let tls = "IO error: received fatal alert: BadCertificate";
        assert!(nats_hint(tls).contains("tls_client_cert"));
        let credentials = "authorization violation";
        assert!(nats_hint(credentials).contains("nkey_seed"));
        let refused = "IO error: Connection refused (os error 111)";
        assert_eq!(nats_hint(refused), "is nats-server running?");
    }
}
