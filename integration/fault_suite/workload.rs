//! The fault suite's writer: seeded random transactions of 1 to 1,000 row changes over three
//! tables, with TOASTed values, key changes and an occasional TRUNCATE.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const TABLES: &str = "
CREATE TABLE t_a (id BIGINT PRIMARY KEY, n INT NOT NULL, note TEXT);
CREATE TABLE t_b (id BIGINT PRIMARY KEY, doc JSONB, big TEXT);
CREATE TABLE t_c (k TEXT PRIMARY KEY, v BIGINT, flag BOOLEAN);";

/// Each table's rows as JSON objects keyed by primary key, in the shape of an event's `data`.
pub const TABLE_ROWS: [(&str, &str); 3] = [
    (
        "public.t_a",
        "SELECT id::text, jsonb_build_object('id', id, 'n', n, 'note', note)::text FROM t_a",
    ),
    (
        "public.t_b",
        "SELECT id::text, jsonb_build_object('id', id, 'doc', doc, 'big', big)::text FROM t_b",
    ),
    (
        "public.t_c",
        "SELECT k, jsonb_build_object('k', k, 'v', v, 'flag', flag)::text FROM t_c",
    ),
];

/// Each table's rows, as [`TABLE_ROWS`] reads them.
pub async fn table_rows(
    client: &tokio_postgres::Client,
) -> anyhow::Result<HashMap<&'static str, BTreeMap<String, serde_json::Value>>> {
    let mut tables = HashMap::new();
    for (table, sql) in TABLE_ROWS {
        let mut rows = BTreeMap::new();
        for row in client.query(sql, &[]).await? {
            let (key, json): (String, String) = (row.get(0), row.get(1));
            rows.insert(key, serde_json::from_str(&json)?);
        }
        tables.insert(table, rows);
    }
    Ok(tables)
}

/// What the writer did; what it committed is read from the WAL, not from here.
#[derive(Debug, Default)]
pub struct Written {
    pub attempted: u64,
    pub acknowledged: u64,
    pub failed: u64,
}

/// Commits random transactions until `stop`, reconnecting whenever PostgreSQL goes away.
pub async fn write(url: String, seed: u64, stop: Arc<AtomicBool>) -> Written {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut written = Written::default();
    let mut client = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(connected) = &client else {
            client = walstream::postgres::connect(&url).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let sql = transaction(&mut rng);
        written.attempted += 1;
        match connected.batch_execute(&sql).await {
            Ok(()) => written.acknowledged += 1,
            Err(_) => {
                written.failed += 1;
                if connected.is_closed() {
                    client = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..15))).await;
    }
    written
}

/// One transaction's SQL, `BEGIN` to `COMMIT`.
fn transaction(rng: &mut fastrand::Rng) -> String {
    if rng.u32(0..150) == 0 {
        let table = ["t_a", "t_b", "t_c"][rng.usize(0..3)];
        return format!("BEGIN; TRUNCATE {table}; COMMIT;");
    }
    let target = match rng.u32(0..100) {
        0..=69 => rng.u64(1..=10),
        70..=94 => rng.u64(11..=100),
        _ => rng.u64(101..=1000),
    };
    let mut sql = String::from("BEGIN;");
    let mut rows = 0;
    while rows < target {
        let (statement, touched) = statement(rng, target - rows);
        sql.push_str(&statement);
        sql.push(';');
        rows += touched;
    }
    sql.push_str("COMMIT;");
    sql
}

/// A statement touching at most `budget` rows (at least one), and that bound.
fn statement(rng: &mut fastrand::Rng, budget: u64) -> (String, u64) {
    let span = |rng: &mut fastrand::Rng, max: u64| rng.u64(1..=budget.min(max));
    match rng.u32(0..10) {
        0..=2 => {
            let (n, lo) = (span(rng, 500), rng.u64(1..20_000));
            let note = note(rng);
            (
                format!(
                    "INSERT INTO t_a (id, n, note) SELECT g, {}, {note} FROM generate_series({lo}, {}) g \
                     ON CONFLICT (id) DO UPDATE SET n = t_a.n + 1, note = EXCLUDED.note",
                    rng.i32(-1000..1000),
                    lo + n - 1
                ),
                n,
            )
        }
        3 => {
            let (n, lo) = (span(rng, 300), rng.u64(1..20_000));
            (
                format!(
                    "UPDATE t_a SET n = n + 1 WHERE id BETWEEN {lo} AND {}",
                    lo + n - 1
                ),
                n,
            )
        }
        4 => {
            let (n, lo) = (span(rng, 100), rng.u64(1..20_000));
            (
                format!("DELETE FROM t_a WHERE id BETWEEN {lo} AND {}", lo + n - 1),
                n,
            )
        }
        5 => {
            // Out-of-line TOAST values; a conflict updates `doc` only, so `big` goes out as
            // an unchanged TOAST column.
            let (n, lo) = (span(rng, 3), rng.u64(1..2_000));
            let tag = rng.u32(..);
            (
                format!(
                    "INSERT INTO t_b (id, doc, big) SELECT g, jsonb_build_object('v', g, 'tag', {tag}), \
                     {} FROM generate_series({lo}, {}) g \
                     ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
                    big_value(tag, "g"),
                    lo + n - 1
                ),
                n,
            )
        }
        6 => {
            let (n, lo) = (span(rng, 20), rng.u64(1..2_000));
            let (u, tag) = (rng.u32(..), rng.u32(..));
            let statement = if rng.bool() {
                format!(
                    "UPDATE t_b SET doc = doc || jsonb_build_object('u', {u}) WHERE id BETWEEN {lo} AND {}",
                    lo + n - 1
                )
            } else {
                format!(
                    "UPDATE t_b SET big = {} WHERE id BETWEEN {lo} AND {}",
                    big_value(tag, "id"),
                    lo + n.min(3) - 1
                )
            };
            (statement, n)
        }
        7 => {
            let (n, lo) = (span(rng, 10), rng.u64(1..2_000));
            (
                format!("DELETE FROM t_b WHERE id BETWEEN {lo} AND {}", lo + n - 1),
                n,
            )
        }
        8 => {
            let (n, lo) = (span(rng, 200), rng.u64(1..5_000));
            (
                format!(
                    "INSERT INTO t_c (k, v, flag) SELECT 'k' || g, g * {}, g % 2 = 0 \
                     FROM generate_series({lo}, {}) g \
                     ON CONFLICT (k) DO UPDATE SET v = t_c.v + 1, flag = NOT t_c.flag",
                    rng.i64(-100..100),
                    lo + n - 1
                ),
                n,
            )
        }
        _ => {
            // A primary key change (the event carries the old key), or a delete.
            let x = rng.u64(1..5_000);
            let statement = if rng.bool() {
                format!(
                    "UPDATE t_c SET k = k || 'r' WHERE k = 'k{x}' \
                     AND NOT EXISTS (SELECT 1 FROM t_c WHERE k = 'k{x}r')"
                )
            } else {
                format!("DELETE FROM t_c WHERE k IN ('k{x}', 'k{x}r')")
            };
            (statement, 2)
        }
    }
}

/// A note with the characters JSON must escape, or NULL.
fn note(rng: &mut fastrand::Rng) -> String {
    match rng.u32(0..5) {
        0 => "NULL".to_owned(),
        n => format!("'note {n} \"quoted\" \\ é ' || g"),
    }
}

/// About 4 kB of incompressible text per row (`key` names the row): stored out of line.
fn big_value(tag: u32, key: &str) -> String {
    format!(
        "(SELECT string_agg(md5('{tag}:' || {key} || ':' || i), '') FROM generate_series(1, 125) i)"
    )
}
