//! `walstream backfill`: reads a table in primary-key order, one short REPEATABLE READ
//! transaction per chunk, and writes each chunk into the WAL. Progress is kept in a JetStream
//! key-value bucket, so a killed backfill resumes after its last committed chunk.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use postgres_protocol::escape::escape_identifier;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel};

use crate::config::Config;
use crate::nats;
use crate::pipeline::backfill::{ColumnHeader, Header, Kind, PREFIX};
use crate::pipeline::pgoutput::encode_tuple;
use crate::pipeline::source::SESSION_SETTINGS_SQL;
use crate::postgres::{self, db_error, quote_table};

const BUCKET: &str = "walstream_backfill";
/// Writes a backfill message into the WAL, in the caller's transaction.
const EMIT_MESSAGE: &str = "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)";

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct BackfillArgs {
    pub table: String,
    /// A SQL condition on the table's rows (`status = 'open'`).
    pub filter: Option<String>,
    pub chunk_size: usize,
    /// Start over even if a backfill of the table is unfinished.
    pub restart: bool,
    /// Stop an unfinished backfill of the table.
    pub cancel: bool,
}

/// Kept in the bucket after every chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    backfill: u64,
    filter: Option<String>,
    /// Key of the last row emitted; the next chunk starts after it.
    after: Option<Vec<String>>,
    rows: u64,
    chunks: u64,
    /// The chunk being committed: whether it landed is read from its transaction's status.
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    xid: String,
    after: Vec<String>,
    rows: u64,
}

/// The table as the chunks read it.
struct TableShape {
    qualified: String,
    oid: u32,
    columns: Vec<ColumnHeader>,
    /// SQL type of each key column, to cast the cursor's text back.
    key_types: Vec<String>,
    key: Vec<String>,
    /// The publication's row filter: rows outside it are not the table's for walstream.
    row_filter: Option<String>,
}

/// Runs (or resumes, or cancels) a backfill and prints what it did.
pub async fn run(config: &Config, args: &BackfillArgs) -> anyhow::Result<()> {
    let table = config
        .resolve_table(&args.table)
        .map_err(|e| anyhow::anyhow!("--table: {e}"))?;
    if !config.replication.tables.contains(&table) {
        anyhow::bail!(
            "table {table} is not in replication.tables: walstream would not publish its rows. \
             Add it there (and restart walstream) first"
        );
    }
    if args.chunk_size == 0 {
        anyhow::bail!("--chunk-size must be at least 1");
    }
    let mut client = postgres::connect(&config.database.url).await?;
    client
        .batch_execute(SESSION_SETTINGS_SQL)
        .await
        .map_err(|e| anyhow::anyhow!("pinning the session's output settings: {}", db_error(&e)))?;
    let progress_store = progress_bucket(config).await?;
    let progress_key = progress_key(&config.replication.slot, &table);
    let existing = read_progress(&progress_store, &progress_key).await?;

    if args.cancel {
        let Some(existing) = existing else {
            anyhow::bail!("no backfill of {table} is unfinished: nothing to cancel");
        };
        emit(&client, &end_header(existing.backfill, &table)).await?;
        progress_store.purge(&progress_key).await?;
        println!(
            "backfill {} of {table} cancelled after {} rows",
            existing.backfill, existing.rows
        );
        return Ok(());
    }

    let shape = table_shape(&client, config, &table).await?;
    check_filter(&client, &shape, args.filter.as_deref()).await?;
    let mut progress = match existing {
        Some(existing) if !args.restart => {
            if existing.filter != args.filter {
                anyhow::bail!(
                    "a backfill of {table} with --where {:?} is unfinished ({} rows done): run \
                     it again with that condition to resume it, or add --restart to start over, \
                     or --cancel to stop it",
                    existing.filter.as_deref().unwrap_or("(none)"),
                    existing.rows
                );
            }
            let resumed = settle_pending(&client, existing).await?;
            eprintln!(
                "resuming backfill {} of {table} after {} rows",
                resumed.backfill, resumed.rows
            );
            resumed
        }
        _ => start(&client, &shape, args.filter.clone()).await?,
    };
    store_progress(&progress_store, &progress_key, &progress).await?;

    let total = estimate_rows(&client, &shape, args.filter.as_deref()).await;
    let bar = progress_bar(total, progress.rows, &table);
    let started = Instant::now();
    let first_row = progress.rows;
    loop {
        let chunk = read_and_emit_chunk(
            &mut client,
            &shape,
            args,
            &mut progress,
            &progress_store,
            &progress_key,
        )
        .await?;
        if chunk == 0 {
            break;
        }
        bar.set_position(progress.rows);
    }
    bar.finish_and_clear();
    emit(&client, &end_header(progress.backfill, &table)).await?;
    progress_store.purge(&progress_key).await?;
    println!(
        "backfill {} of {table}: {} rows in {} chunks ({} in this run, {:.1} s); walstream \
         publishes them as BACKFILL events",
        progress.backfill,
        progress.rows,
        progress.chunks,
        progress.rows - first_row,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Announces the backfill to the pipeline, then waits for the transactions that were running
/// to finish: from then on, every change a chunk's snapshot misses is one the pipeline saw.
async fn start(
    client: &Client,
    shape: &TableShape,
    filter: Option<String>,
) -> anyhow::Result<Progress> {
    let backfill = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1_000_000;
    let header = Header {
        backfill,
        kind: Kind::Start,
        table: shape.qualified.clone(),
        key: shape.key.clone(),
        oid: shape.oid,
        columns: Vec::new(),
        rows: 0,
        snapshot: None,
    };
    emit(client, &header).await?;
    wait_for_running_transactions(client).await?;
    Ok(Progress {
        backfill,
        filter,
        after: None,
        rows: 0,
        chunks: 0,
        pending: None,
    })
}

async fn wait_for_running_transactions(client: &Client) -> anyhow::Result<()> {
    let snapshot: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(|e| anyhow::anyhow!("reading the snapshot: {}", db_error(&e)))?
        .get(0);
    let running: Vec<String> = snapshot
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect();
    let started = Instant::now();
    let mut told = false;
    loop {
        let still: i64 = client
            .query_one(
                "SELECT count(*) FROM unnest($1::text[]) x
                 WHERE pg_xact_status(x::xid8) = 'in progress'",
                &[&running],
            )
            .await
            .map_err(|e| anyhow::anyhow!("checking running transactions: {}", db_error(&e)))?
            .get(0);
        if still == 0 {
            return Ok(());
        }
        if !told && started.elapsed() > Duration::from_secs(5) {
            told = true;
            eprintln!(
                "waiting for {still} transaction(s) that were writing when the backfill \
                 started (see pg_stat_activity); the backfill begins when they end"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the next chunk and writes it into the WAL in one transaction; returns its row count
/// (0: the table is done).
async fn read_and_emit_chunk(
    client: &mut Client,
    shape: &TableShape,
    args: &BackfillArgs,
    progress: &mut Progress,
    store: &kv::Store,
    key: &str,
) -> anyhow::Result<usize> {
    let select = chunk_query(shape, args.filter.as_deref(), progress.after.is_some());
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let head = tx
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_current_xact_id()::text",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("starting a chunk: {}", db_error(&e)))?;
    let (snapshot, xid): (String, String) = (head.get(0), head.get(1));
    let limit = args.chunk_size as i64;
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(after) = &progress.after {
        params.extend(after.iter().map(|v| v as &(dyn ToSql + Sync)));
    }
    params.push(&limit);
    let rows = tx
        .query(&select, &params)
        .await
        .map_err(|e| anyhow::anyhow!("reading a chunk of {}: {}", shape.qualified, db_error(&e)))?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let mut tuples = Vec::new();
    for row in &rows {
        let values: Vec<Option<String>> = (0..shape.columns.len()).map(|i| row.get(i)).collect();
        encode_tuple(
            &mut tuples,
            values.iter().map(|v| v.as_deref().map(str::as_bytes)),
        )
        .context("a row too wide for a backfill chunk")?;
    }
    let last = rows.last().expect("not empty");
    let after: Vec<String> = (0..shape.key.len())
        .map(|i| last.get(shape.columns.len() + i))
        .collect();
    let header = Header {
        backfill: progress.backfill,
        kind: Kind::Chunk,
        table: shape.qualified.clone(),
        key: shape.key.clone(),
        oid: shape.oid,
        columns: shape.columns.clone(),
        rows: rows.len(),
        snapshot: Some(snapshot),
    };
    tx.execute(EMIT_MESSAGE, &[&PREFIX, &header.encode(&tuples)])
        .await
        .map_err(|e| anyhow::anyhow!("writing a chunk into the WAL: {}", db_error(&e)))?;
    progress.pending = Some(Pending {
        xid,
        after: after.clone(),
        rows: rows.len() as u64,
    });
    store_progress(store, key, progress).await?;
    tx.commit()
        .await
        .map_err(|e| anyhow::anyhow!("committing a chunk: {}", db_error(&e)))?;
    progress.pending = None;
    progress.after = Some(after);
    progress.rows += rows.len() as u64;
    progress.chunks += 1;
    store_progress(store, key, progress).await?;
    Ok(rows.len())
}

/// `SELECT col::text, …, key::text, … FROM t WHERE (filter) AND (key) > (cursor) ORDER BY key
/// LIMIT n`: the cursor and the limit are bound parameters.
fn chunk_query(shape: &TableShape, filter: Option<&str>, has_cursor: bool) -> String {
    // Aliased: an output column named like a key column would make ORDER BY sort its text.
    let columns: Vec<String> = shape
        .columns
        .iter()
        .map(|c| &c.name)
        .chain(&shape.key)
        .enumerate()
        .map(|(i, name)| format!("{}::text AS c{i}", escape_identifier(name)))
        .collect();
    let key_list: Vec<String> = shape.key.iter().map(|k| escape_identifier(k)).collect();
    let key_list = key_list.join(", ");
    let mut conditions = Vec::new();
    for filter in [shape.row_filter.as_deref(), filter].into_iter().flatten() {
        conditions.push(format!("({filter})"));
    }
    if has_cursor {
        let cursor: Vec<String> = shape
            .key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("CAST(${}::text AS {ty})", i + 1))
            .collect();
        conditions.push(format!("({key_list}) > ({})", cursor.join(", ")));
    }
    let limit = if has_cursor { shape.key.len() + 1 } else { 1 };
    format!(
        "SELECT {} FROM {} {} ORDER BY {key_list} LIMIT ${limit}",
        columns.join(", "),
        quote_table(&shape.qualified),
        if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        }
    )
}

/// The published columns (what pgoutput sends), their types and the primary key.
async fn table_shape(client: &Client, config: &Config, table: &str) -> anyhow::Result<TableShape> {
    let quoted = quote_table(table);
    let oid: u32 = client
        .query_one("SELECT $1::text::regclass::oid", &[&quoted])
        .await
        .map_err(|e| anyhow::anyhow!("table {table}: {}", db_error(&e)))?
        .get(0);
    let publication = &config.replication.publication;
    let Some(published) = postgres::published_table(client, publication, table).await? else {
        anyhow::bail!(
            "table {table} is not in publication {publication}: start walstream once (it adds \
             the tables it watches) or run `walstream setup`"
        );
    };
    let key: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading the primary key of {table}: {}", db_error(&e)))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if key.is_empty() {
        anyhow::bail!(
            "table {table} has no primary key: backfill reads a table in primary-key order, \
             one chunk at a time. Add a primary key to backfill it"
        );
    }
    let is_published = |name: &String| published.columns.as_ref().is_none_or(|c| c.contains(name));
    if let Some(missing) = key.iter().find(|k| !is_published(k)) {
        anyhow::bail!(
            "primary-key column {missing} of {table} is not in publication {}'s column list",
            config.replication.publication
        );
    }
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
                    t.typname::text
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading the columns of {table}: {}", db_error(&e)))?;
    let mut columns = Vec::new();
    let mut key_types = vec![String::new(); key.len()];
    for row in rows {
        let name: String = row.get(0);
        if !is_published(&name) {
            continue;
        }
        let type_oid: u32 = row.get(1);
        if let Some(position) = key.iter().position(|k| *k == name) {
            key_types[position] = row.get(2);
        }
        columns.push(ColumnHeader {
            key: key.contains(&name),
            name,
            type_oid,
            // pgoutput names only types outside the built-in range.
            type_name: (type_oid >= 16384).then(|| row.get(3)),
        });
    }
    Ok(TableShape {
        qualified: table.to_owned(),
        oid,
        columns,
        key_types,
        key,
        row_filter: published.row_filter,
    })
}

async fn check_filter(
    client: &Client,
    shape: &TableShape,
    filter: Option<&str>,
) -> anyhow::Result<()> {
    let Some(filter) = filter else { return Ok(()) };
    let probe = format!(
        "SELECT 1 FROM {} WHERE ({filter}) LIMIT 0",
        quote_table(&shape.qualified)
    );
    client.query(&probe, &[]).await.map_err(|e| {
        anyhow::anyhow!(
            "--where `{filter}` is not a condition on {}: {}",
            shape.qualified,
            db_error(&e)
        )
    })?;
    Ok(())
}

async fn estimate_rows(client: &Client, shape: &TableShape, filter: Option<&str>) -> Option<u64> {
    let query = format!(
        "SELECT count(*) FROM {}{}",
        quote_table(&shape.qualified),
        filter.map(|f| format!(" WHERE ({f})")).unwrap_or_default()
    );
    let count: i64 = client.query_one(&query, &[]).await.ok()?.get(0);
    Some(count as u64)
}

fn progress_bar(total: Option<u64>, done: u64, table: &str) -> indicatif::ProgressBar {
    let bar = match total {
        Some(total) => indicatif::ProgressBar::new(total.max(done)),
        None => indicatif::ProgressBar::no_length(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("backfill {table}"));
    bar.set_position(done);
    bar
}

/// A chunk that was being committed when the backfill stopped: whether it landed is in its
/// transaction's status.
async fn settle_pending(client: &Client, mut progress: Progress) -> anyhow::Result<Progress> {
    let Some(pending) = progress.pending.take() else {
        return Ok(progress);
    };
    // A killed backfill's transaction ends when PostgreSQL notices the lost connection.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status: Option<String> = client
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&pending.xid])
            .await
            .map_err(|e| anyhow::anyhow!("reading a chunk's transaction status: {}", db_error(&e)))?
            .get(0);
        if status.as_deref() != Some("in progress") {
            break status;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the transaction of the chunk being committed when the backfill stopped \
                 ({}) is still open after 60 s; end it (pg_stat_activity) and run again",
                pending.xid
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if status.as_deref() == Some("committed") {
        progress.after = Some(pending.after);
        progress.rows += pending.rows;
        progress.chunks += 1;
    }
    Ok(progress)
}

fn end_header(backfill: u64, table: &str) -> Header {
    Header {
        backfill,
        kind: Kind::End,
        table: table.to_owned(),
        key: Vec::new(),
        oid: 0,
        columns: Vec::new(),
        rows: 0,
        snapshot: None,
    }
}

/// Writes a message without rows in a transaction of its own.
async fn emit(client: &Client, header: &Header) -> anyhow::Result<()> {
    client
        .execute(EMIT_MESSAGE, &[&PREFIX, &header.encode(&[])])
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "writing the backfill's {:?} message into the WAL: {} (the role needs EXECUTE \
                 on pg_logical_emit_message)",
                header.kind,
                db_error(&e)
            )
        })?;
    Ok(())
}

async fn progress_bucket(config: &Config) -> anyhow::Result<kv::Store> {
    let js = nats::jetstream_for_command(&config.nats).await?;
    nats::ensure_key_value(
        &js,
        BUCKET,
        "walstream backfill progress",
        Duration::ZERO,
        config.nats.jetstream.replicas,
    )
    .await
}

/// `<slot>.<schema>.<table>`, with characters a key may not hold replaced.
fn progress_key(slot: &str, table: &str) -> String {
    format!("{slot}.{table}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn read_progress(store: &kv::Store, key: &str) -> anyhow::Result<Option<Progress>> {
    let Some(entry) = store
        .entry(key)
        .await
        .map_err(|e| anyhow::anyhow!("reading backfill progress: {e}"))?
    else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    serde_json::from_slice(&entry.value)
        .map(Some)
        .with_context(|| format!("backfill progress under {key} is not readable"))
}

async fn store_progress(store: &kv::Store, key: &str, progress: &Progress) -> anyhow::Result<()> {
    store
        .put(key, serde_json::to_vec(progress)?.into())
        .await
        .map_err(|e| anyhow::anyhow!("storing backfill progress: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> TableShape {
        TableShape {
            qualified: "public.tb_order".into(),
            oid: 1,
            columns: ["a", "b"]
                .iter()
                .map(|n| ColumnHeader {
                    name: (*n).into(),
                    type_oid: 23,
                    type_name: None,
                    key: *n == "a",
                })
                .collect(),
            key_types: vec!["integer".into()],
            key: vec!["a".into()],
            row_filter: None,
        }
    }

    #[test]
    fn chunks_bind_the_cursor_and_limit() {
        assert_eq!(
            chunk_query(&shape(), None, false),
            "SELECT \"a\"::text AS c0, \"b\"::text AS c1, \"a\"::text AS c2 FROM \
             \"public\".\"tb_order\"  ORDER BY \"a\" LIMIT $1"
        );
        assert_eq!(
            chunk_query(&shape(), Some("b > 3"), true),
            "SELECT \"a\"::text AS c0, \"b\"::text AS c1, \"a\"::text AS c2 FROM \
             \"public\".\"tb_order\" WHERE (b > 3) AND (\"a\") > (CAST($1::text AS integer)) \
             ORDER BY \"a\" LIMIT $2"
        );
    }

    #[test]
    fn progress_keys_are_valid_kv_keys() {
        assert_eq!(
            progress_key("walstream", "public.my table"),
            "walstream.public.my_table"
        );
    }
}
