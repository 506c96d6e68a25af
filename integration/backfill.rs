//! Backfills: a table's rows emitted online under live changes, never stale, each once, after
//! walstream or the backfill itself is killed.

mod harness;

use harness::output::*;
use harness::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BACKFILLED: &str =
    "CREATE TABLE t_bf (id INT PRIMARY KEY, v INT NOT NULL, note TEXT NOT NULL);
     CREATE TABLE t_sentinel (id INT PRIMARY KEY)";

/// Inserts a sentinel row and waits until its event is the stream's last message: every change
/// committed before it is then in the stream.
async fn settle(
    cluster: &Cluster,
    js: &async_nats::jetstream::Context,
    id: i32,
) -> anyhow::Result<()> {
    cluster
        .client()
        .await?
        .execute("INSERT INTO t_sentinel VALUES ($1)", &[&id])
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut stream) = js.get_stream(STREAM).await {
            let last = stream.info().await?.state.last_sequence;
            if let Ok(message) = stream.get_raw_message(last).await {
                let body: Value = serde_json::from_slice(&message.payload).unwrap_or_default();
                if body["table"] == "public.t_sentinel" && body["data"]["id"] == id {
                    return Ok(());
                }
            }
        }
        if std::time::Instant::now() > deadline {
            dump_log(&cluster.log_path());
            anyhow::bail!("the sentinel event did not arrive within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Servers with `t_bf` holding `rows` rows from before walstream existed, and its config.
async fn backfill_table(rows: i32) -> anyhow::Result<(Cluster, PathBuf)> {
    let cluster = Cluster::start().await?;
    cluster.sql(BACKFILLED).await?;
    cluster
        .client()
        .await?
        .execute(
            "INSERT INTO t_bf SELECT i, 0, 'old' FROM generate_series(1, $1) i",
            &[&rows],
        )
        .await?;
    let config = cluster.config(&["public.t_bf", "public.t_sentinel"], "")?;
    setup(&config)?;
    Ok((cluster, config))
}

/// The table's rows as the stream tells them: every event of `t_bf` applied in stream order.
fn fold(messages: &[Stored]) -> HashMap<i64, Value> {
    let mut rows = HashMap::new();
    for message in messages.iter().filter(|m| m.body["table"] == "public.t_bf") {
        let id = message.body["data"]["id"].as_i64().expect("an id");
        match message.body["event"].as_str() {
            Some("DELETE") => {
                rows.remove(&id);
            }
            Some("INSERT" | "UPDATE" | "BACKFILL") => {
                rows.insert(id, message.body["data"].clone());
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    rows
}

async fn table_rows(cluster: &Cluster) -> anyhow::Result<HashMap<i64, Value>> {
    let client = cluster.client().await?;
    let rows = client.query("SELECT id, v, note FROM t_bf", &[]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let id: i32 = row.get(0);
            let v: i32 = row.get(1);
            let note: String = row.get(2);
            (
                i64::from(id),
                serde_json::json!({"id": id, "v": v, "note": note}),
            )
        })
        .collect())
}

fn backfill_command(config: &std::path::Path, extra: &[&str]) -> Command {
    let mut command = Command::new(walstream_binary());
    command
        .args(["backfill", "--table", "public.t_bf"])
        .args(extra)
        .arg("--config")
        .arg(config);
    command
}

/// Updates, deletes and inserts random rows of `t_bf`, one transaction each, about `per_second`
/// of them, until `stop`; returns how many it made.
fn spawn_writer(
    cluster: &Cluster,
    per_second: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    let url = cluster.db_url();
    tokio::spawn(async move {
        let client = walstream::postgres::connect(&url).await?;
        let made = AtomicU64::new(0);
        let mut state: u64 = 0x2545F4914F6CDD1D;
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let id = (state % 110_000) as i32 + 1;
            let statement = match state % 20 {
                0..=13 => "UPDATE t_bf SET v = v + 1, note = 'live' WHERE id = $1",
                14..=16 => "DELETE FROM t_bf WHERE id = $1",
                _ => "INSERT INTO t_bf VALUES ($1, 1000, 'new') ON CONFLICT (id) DO NOTHING",
            };
            client.execute(statement, &[&id]).await?;
            made.fetch_add(1, Ordering::Relaxed);
        }
        Ok(made.load(Ordering::Relaxed))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_under_live_changes_ends_with_the_tables_state_and_nothing_stale(
) -> anyhow::Result<()> {
    backfill_under_live_changes(None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn walstream_killed_during_a_backfill_resumes_and_still_delivers_nothing_stale(
) -> anyhow::Result<()> {
    backfill_under_live_changes(Some(Duration::from_millis(700))).await
}

/// Backfills 100,000 rows while a writer changes the table about 1,000 times a second, with
/// walstream SIGKILLed and restarted `kill_after` into the backfill; then folds the stream's
/// events and compares with the table.
async fn backfill_under_live_changes(kill_after: Option<Duration>) -> anyhow::Result<()> {
    let (cluster, config) = backfill_table(100_000).await?;
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let js = cluster.jetstream().await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&cluster, 1000, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let chunk_size = if kill_after.is_some() { "100" } else { "1000" };
    let backfill = tokio::task::spawn_blocking({
        let config = config.clone();
        move || backfill_command(&config, &["--chunk-size", chunk_size]).output()
    });
    if let Some(after) = kill_after {
        tokio::time::sleep(after).await;
        walstream_process.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        walstream_process = Walstream::start(&config, &cluster.log_path())?;
    }
    let output = backfill.await??;
    let backfill_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await??;
    anyhow::ensure!(output.status.success(), "backfill: {}", stderr(&output));
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("BACKFILL events"), "{summary}");
    println!("{summary}");

    settle(&cluster, &js, 1).await?;
    let messages = read_stream(&js).await?;
    let backfilled = messages
        .iter()
        .filter(|m| m.body["event"] == "BACKFILL")
        .count();
    println!(
        "backfill took {backfill_secs:.1} s beside {changes} live changes ({:.0}/s over the \
         writer's run); {backfilled} BACKFILL events",
        changes as f64 / (backfill_secs + 1.0)
    );
    assert!(changes > 1000, "the writer made {changes} changes");
    assert!(backfilled > 90_000, "{backfilled} rows backfilled");
    let streamed = fold(&messages);
    let table = table_rows(&cluster).await?;
    let wrong: Vec<_> = table
        .iter()
        .filter(|(id, row)| streamed.get(id) != Some(row))
        .take(5)
        .map(|(id, row)| (id, row, streamed.get(id)))
        .collect();
    if !wrong.is_empty() {
        dump_log(&cluster.log_path());
    }
    assert!(
        wrong.is_empty(),
        "rows whose last event is not their state: {wrong:?}"
    );
    assert_eq!(streamed.len(), table.len(), "no deleted row brought back");
    drop(walstream_process);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_backfill_resumes_after_its_last_chunk_and_emits_each_row_once(
) -> anyhow::Result<()> {
    let (cluster, config) = backfill_table(50000).await?;
    let js = cluster.jetstream().await?;

    let mut first = backfill_command(&config, &["--chunk-size", "200"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let progress = loop {
        if let Some(status) = first.try_wait()? {
            anyhow::bail!("the backfill finished ({status}) before it could be killed");
        }
        // Only when to kill depends on this read: one that fails (a request timing out on a
        // loaded machine) is read again.
        let done = match js.get_key_value("walstream_backfill").await {
            Ok(store) => store
                .get("walstream.public.t_bf")
                .await
                .ok()
                .flatten()
                .and_then(|value| serde_json::from_slice::<Value>(&value).ok())
                .and_then(|value| value["rows"].as_u64())
                .unwrap_or(0),
            Err(_) => 0,
        };
        if done >= 10_000 {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill()?;
    first.wait()?;
    assert!(progress < 50_000);

    let output = backfill_command(&config, &["--chunk-size", "200"]).output()?;
    anyhow::ensure!(
        output.status.success(),
        "resumed backfill: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("resuming backfill"),
        "{}",
        stderr(&output)
    );

    // walstream starts only now: the chunks waited in the WAL.
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    settle(&cluster, &js, 1).await?;
    let messages = read_stream(&js).await?;
    let mut seen = HashSet::new();
    for message in messages.iter().filter(|m| m.body["event"] == "BACKFILL") {
        let id = message.body["data"]["id"].as_i64().expect("an id");
        assert!(seen.insert(id), "row {id} backfilled twice");
    }
    assert_eq!(seen.len(), 50_000, "every row backfilled once");
    assert_eq!(fold(&messages), table_rows(&cluster).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_mistakes_are_named_and_where_filters_rows() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(BACKFILLED).await?;
    cluster
        .sql(
            "INSERT INTO t_bf SELECT i, i, 'old' FROM generate_series(1, 100) i;
             CREATE TABLE t_nokey (v INT); ALTER TABLE t_nokey REPLICA IDENTITY FULL;
             CREATE TABLE t_other (id INT PRIMARY KEY)",
        )
        .await?;
    let config = cluster.config(&["public.t_bf", "public.t_sentinel", "public.t_nokey"], "")?;
    setup(&config)?;
    let failure = |output: Output| {
        assert!(!output.status.success());
        stderr(&output)
    };
    let text = failure(walstream(
        &["backfill", "--table", "public.t_other"],
        &config,
    )?);
    assert!(text.contains("is not in replication.tables"), "{text}");
    let text = failure(walstream(
        &["backfill", "--table", "public.t_nokey"],
        &config,
    )?);
    assert!(text.contains("has no primary key"), "{text}");
    let text = failure(backfill_command(&config, &["--where", "nonsense ="]).output()?);
    assert!(
        text.contains("--where `nonsense =` is not a condition"),
        "{text}"
    );
    let text = failure(backfill_command(&config, &["--cancel"]).output()?);
    assert!(text.contains("nothing to cancel"), "{text}");

    let output =
        backfill_command(&config, &["--where", "v % 10 = 0", "--chunk-size", "3"]).output()?;
    anyhow::ensure!(output.status.success(), "{}", stderr(&output));
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    settle(&cluster, &js, 1).await?;
    let messages = read_stream(&js).await?;
    let ids: Vec<i64> = messages
        .iter()
        .filter(|m| m.body["event"] == "BACKFILL")
        .map(|m| m.body["data"]["id"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(ids, (1..=10).map(|i| i * 10).collect::<Vec<_>>());
    let first = messages
        .iter()
        .find(|m| m.body["event"] == "BACKFILL")
        .expect("one");
    assert_eq!(first.subject, "fraiseql.mutation.TBf.BACKFILL");
    assert_eq!(
        first.body["data"],
        serde_json::json!({"id": 10, "v": 10, "note": "old"})
    );
    Ok(())
}

/// The window a restart must not lose, made to happen: a live change commits while a chunk's
/// transaction is open (so the chunk holds the row's old value), walstream publishes the change
/// and checkpoints past it, is SIGKILLed, and only then does the chunk commit. The restarted
/// walstream must still know the row was overtaken.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_between_a_live_change_and_its_stale_chunk_still_drops_the_row(
) -> anyhow::Result<()> {
    use walstream::pipeline::backfill::{ColumnHeader, Header, Kind, PREFIX};
    let (cluster, config) = backfill_table(3).await?;
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let js = cluster.jetstream().await?;

    let mut chunk_client = cluster.client().await?;
    let oid: u32 = chunk_client
        .query_one("SELECT 'public.t_bf'::regclass::oid", &[])
        .await?
        .get(0);
    let header = |kind, rows, snapshot: Option<String>| Header {
        backfill: 1,
        kind,
        table: "public.t_bf".into(),
        key: vec!["id".into()],
        oid,
        columns: [("id", 23), ("v", 23), ("note", 25)]
            .iter()
            .map(|(name, type_oid)| ColumnHeader {
                name: (*name).into(),
                type_oid: *type_oid,
                type_name: None,
                key: *name == "id",
            })
            .collect(),
        rows,
        snapshot,
    };
    let emit = "SELECT pg_logical_emit_message(true, $1::text, $2::bytea)";
    chunk_client
        .execute(emit, &[&PREFIX, &header(Kind::Start, 0, None).encode(&[])])
        .await?;

    let chunk = chunk_client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let snapshot: String = chunk
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let rows = chunk
        .query("SELECT id::text, v::text, note FROM t_bf ORDER BY id", &[])
        .await?;
    // The live change, committed while the chunk is open: the chunk keeps row 2's old value.
    cluster
        .sql("UPDATE t_bf SET v = 1, note = 'live' WHERE id = 2")
        .await?;
    settle(&cluster, &js, 1).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // checkpointed past the update
    walstream_process.kill();

    let mut tuples = Vec::new();
    for row in &rows {
        let values: Vec<String> = (0..3).map(|i| row.get(i)).collect();
        walstream::pipeline::pgoutput::encode_tuple(
            &mut tuples,
            values.iter().map(|v| Some(v.as_bytes())),
        )?;
    }
    let message = header(Kind::Chunk, rows.len(), Some(snapshot)).encode(&tuples);
    chunk.execute(emit, &[&PREFIX, &message]).await?;
    chunk.commit().await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    settle(&cluster, &js, 2).await?;

    let messages = read_stream(&js).await?;
    let backfilled: Vec<i64> = messages
        .iter()
        .filter(|m| m.body["event"] == "BACKFILL")
        .map(|m| m.body["data"]["id"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(backfilled, vec![1, 3], "row 2's stale value is dropped");
    assert_eq!(fold(&messages), table_rows(&cluster).await?);
    Ok(())
}
