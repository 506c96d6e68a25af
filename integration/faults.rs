//! The streamer under faults: kill -9, NATS down, PostgreSQL restarted, SIGTERM, a large
//! transaction, an idle publication. After each, the stream holds every committed change
//! exactly once and in commit order.

mod harness;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::*;

const TABLE: &str = "CREATE TABLE t_load (id BIGINT PRIMARY KEY, payload TEXT NOT NULL);";

/// Commits `transactions` transactions of `rows_per_tx` inserts each, numbered from `first_id`,
/// reconnecting when PostgreSQL restarts. Returns the ids it committed.
async fn write_load(
    url: String,
    first_id: i64,
    transactions: i64,
    rows_per_tx: i64,
    pause: Duration,
) -> anyhow::Result<BTreeSet<i64>> {
    let mut committed = BTreeSet::new();
    let mut client = None;
    let mut tx = 0;
    while tx < transactions {
        if client.is_none() {
            client = walstream::postgres::connect(&url).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let Some(connected) = &client else { continue };
        let start = first_id + tx * rows_per_tx;
        // A restart can end the connection after the commit and before its answer: the retry
        // then meets its own rows. Without `ON CONFLICT` it failed on the key forever, and the
        // test never ended (it hung a CI run that way).
        let sql = format!(
            "INSERT INTO t_load SELECT g, 'row ' || g FROM generate_series({start}, {}) g \
             ON CONFLICT (id) DO NOTHING",
            start + rows_per_tx - 1
        );
        // A server restarting under the writer can leave a statement unanswered; it is then
        // abandoned like a failed one rather than waited on forever.
        let written = tokio::time::timeout(Duration::from_secs(30), connected.batch_execute(&sql));
        match written.await {
            Ok(Ok(())) => {
                committed.extend(start..start + rows_per_tx);
                tx += 1;
            }
            Ok(Err(_)) => client = None,
            Err(_) => {
                eprintln!("write_load: no answer to a transaction within 30 s; reconnecting");
                client = None;
            }
        }
        tokio::time::sleep(pause).await;
    }
    Ok(committed)
}

/// Servers with `t_load`, and walstream streaming it (its slot exists).
async fn streaming_load_table() -> anyhow::Result<(Cluster, std::path::PathBuf, Walstream)> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    Ok((cluster, config, walstream))
}

/// Ids actually in the table: the truth the stream is checked against.
async fn table_ids(cluster: &Cluster) -> anyhow::Result<BTreeSet<i64>> {
    let client = cluster.client().await?;
    let rows = client.query("SELECT id FROM t_load", &[]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Asserts that the walstream log shows `needle` at least `times` times: the fault really hit.
fn assert_log_shows(cluster: &Cluster, needle: &str, times: usize) -> anyhow::Result<()> {
    let log = std::fs::read_to_string(cluster.log_path())?;
    let found = log.matches(needle).count();
    if found < times {
        dump_log(&cluster.log_path());
        anyhow::bail!("the log shows {needle:?} {found} times, expected at least {times}");
    }
    Ok(())
}

/// Waits until the stream holds one INSERT per row of the table, then checks the invariants.
async fn assert_stream_matches_table(cluster: &Cluster) -> anyhow::Result<Vec<Stored>> {
    let expected = table_ids(cluster).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, expected.len() as u64, Duration::from_secs(120))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    // Give a duplicate, if any were coming, the chance to land before reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = read_stream(&js).await?;
    assert_exactly_once_in_order(&messages);
    let streamed: Vec<i64> = messages
        .iter()
        .map(|m| m.body["data"]["id"].as_i64().expect("id"))
        .collect();
    let streamed_set: BTreeSet<i64> = streamed.iter().copied().collect();
    assert_eq!(
        streamed.len(),
        streamed_set.len(),
        "a row was streamed twice"
    );
    assert_eq!(streamed_set, expected, "the stream and the table differ");
    Ok(messages)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let (cluster, config, mut walstream) = streaming_load_table().await?;
    let writer = tokio::spawn(write_load(
        cluster.db_url(),
        1,
        400,
        25,
        Duration::from_millis(5),
    ));
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        walstream.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        walstream = Walstream::start(&config, &cluster.log_path())?;
    }
    let committed = writer.await??;
    assert_eq!(committed.len(), 400 * 25);
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 10_000);
    assert_log_shows(&cluster, "starting replication", 5)?;
    assert_log_shows(&cluster, "skip_through=Some", 4)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_down_for_ten_seconds_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let (mut cluster, _config, _walstream) = streaming_load_table().await?;
    let writer = tokio::spawn(write_load(
        cluster.db_url(),
        1,
        600,
        10,
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nats.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.nats.start()?;
    writer.await??;
    assert_stream_matches_table(&cluster).await?;
    assert_log_shows(&cluster, "NATS disconnected", 1)?;
    assert_log_shows(&cluster, "re-syncing with the stream", 1)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarts_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let (cluster, _config, _walstream) = streaming_load_table().await?;
    let writer = tokio::spawn(write_load(
        cluster.db_url(),
        1,
        500,
        10,
        Duration::from_millis(10),
    ));
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.postgres.stop(mode)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.postgres.start()?;
    }
    writer.await??;
    assert_stream_matches_table(&cluster).await?;
    assert_log_shows(&cluster, "replication connection lost", 2)?;
    assert_log_shows(&cluster, "starting replication", 3)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_checkpoints_and_exits_zero() -> anyhow::Result<()> {
    let (cluster, _config, mut walstream) = streaming_load_table().await?;
    let client = cluster.client().await?;
    write_load(cluster.db_url(), 1, 50, 100, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 5000, Duration::from_secs(60)).await?;
    let status = walstream.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(log.contains("stopped"), "no clean stop in the log");
    // The slot is confirmed at the end of the last transaction: nothing is re-read at restart.
    let slot = walstream::postgres::slot_info(&client, "walstream")
        .await?
        .expect("slot");
    let last_end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let confirmed = slot.confirmed_flush_lsn.expect("confirmed");
    let current = walstream::lsn::parse_lsn(&last_end).map_err(anyhow::Error::msg)?;
    assert!(confirmed.0 > 0 && confirmed <= current);
    let messages = assert_stream_matches_table(&cluster).await?;
    let last_commit =
        walstream::lsn::parse_lsn(&messages.last().unwrap().lsn).map_err(anyhow::Error::msg)?;
    assert!(
        confirmed > last_commit,
        "slot confirmed {confirmed}, last commit {last_commit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100k_row_transaction_streams_through() -> anyhow::Result<()> {
    let (cluster, _config, _walstream) = streaming_load_table().await?;
    cluster
        .sql("INSERT INTO t_load SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
        .await?;
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 100_000);
    assert!(
        messages.iter().all(|m| m.lsn == messages[0].lsn),
        "one transaction, one commit LSN"
    );
    assert_eq!(messages.last().unwrap().seq, 99_999);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_publication_does_not_hold_wal_back() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(&format!(
            "{TABLE} CREATE TABLE t_other (id INT PRIMARY KEY, v TEXT);"
        ))
        .await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let client = cluster.client().await?;
    let before = walstream::postgres::slot_info(&client, "walstream")
        .await?
        .and_then(|s| s.confirmed_flush_lsn)
        .expect("confirmed");
    // Busy database, quiet publication: t_other is not published.
    let busy = Arc::new(AtomicBool::new(true));
    let writer = {
        let busy = busy.clone();
        let url = cluster.db_url();
        tokio::spawn(async move {
            let client = walstream::postgres::connect(&url).await?;
            let mut n = 0;
            while busy.load(Ordering::Relaxed) {
                client
                    .batch_execute(&format!(
                        "INSERT INTO t_other VALUES ({n}, repeat('x', 1000))"
                    ))
                    .await?;
                n += 1;
            }
            anyhow::Ok(())
        })
    };
    let advanced = eventually(Duration::from_secs(40), "the slot to advance", || async {
        walstream::postgres::slot_info(&client, "walstream")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.confirmed_flush_lsn)
            .is_some_and(|now| now.0 > before.0 + 1_000_000)
    })
    .await;
    busy.store(false, Ordering::Relaxed);
    writer.await??;
    advanced.inspect_err(|_| dump_log(&cluster.log_path()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_checkpoint_resumes_from_the_stream_without_resending() -> anyhow::Result<()> {
    let (cluster, config, mut walstream) = streaming_load_table().await?;
    write_load(cluster.db_url(), 1, 20, 100, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 2000, Duration::from_secs(60)).await?;
    walstream.kill();
    // A fresh sidecar: its RocksDB is gone; the slot and the stream remember.
    std::fs::remove_dir_all(cluster.dir.path().join("checkpoint"))?;
    write_load(cluster.db_url(), 2001, 20, 100, Duration::ZERO).await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    assert_stream_matches_table(&cluster).await?;
    // Nothing was sent twice: no duplicate acks, no re-sync.
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        !log.contains("duplicate: true"),
        "an event was re-published"
    );
    assert!(!log.contains("re-syncing"), "a publish failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_over_max_payload_stops_walstream_and_resumes_once_fixed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = dir.path().join("nats.conf");
    std::fs::write(&limits, "max_payload: 8192\n")?;
    let mut cluster = Cluster::start_with_nats_args(&["-c", limits.to_str().unwrap()]).await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let mut walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql(
            "INSERT INTO t_load VALUES (1, 'small');
              INSERT INTO t_load VALUES (2, repeat('x', 20000));
              INSERT INTO t_load VALUES (3, 'small again');",
        )
        .await?;
    let status = walstream.wait_exit(Duration::from_secs(30)).await?;
    assert!(!status.success());
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        log.contains("over the NATS server's max_payload of 8192 bytes"),
        "{log}"
    );
    assert!(
        log.contains("fraiseql.mutation.TLoad.INSERT"),
        "the error names the subject"
    );
    let js = cluster.jetstream().await?;
    assert_eq!(
        read_stream(&js).await?.len(),
        1,
        "nothing after the large row is published"
    );

    // Raise the limit, restart: it resumes at the large row.
    cluster.nats.kill();
    let mut nats = walstream::local::LocalNats::new(cluster.dir.path(), cluster.nats.port, &[])?;
    nats.start()?;
    cluster.nats = nats;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silently_dead_link_to_postgres_is_noticed_and_replaced() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let proxy = Blackhole::start(cluster.postgres.port).await?;
    let url = format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", proxy.port);
    let config = cluster.config_with(&url, &["public.t_load"], "receive_timeout_secs = 5", "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    write_load(cluster.db_url(), 1, 10, 100, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1000, Duration::from_secs(30)).await?;

    // Quiet for longer than the watchdog's interval: a quiet link is not a dead one.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        !log.contains("receive watchdog"),
        "a quiet stream was taken for a dead link"
    );

    proxy.freeze();
    write_load(cluster.db_url(), 1001, 10, 100, Duration::ZERO).await?;
    eventually(
        Duration::from_secs(40),
        "the watchdog to notice",
        || async {
            std::fs::read_to_string(cluster.log_path())
                .is_ok_and(|log| log.contains("receive watchdog"))
        },
    )
    .await
    .inspect_err(|_| dump_log(&cluster.log_path()))?;
    proxy.thaw();
    assert_stream_matches_table(&cluster).await?;
    Ok(())
}

/// Peak resident memory of a process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a minute or two; run by hand: cargo test --release --test faults -- --ignored"]
async fn a_million_row_transaction_streams_through_in_bounded_memory() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "[nats.jetstream]\nmax_bytes = -1\n")?;
    let walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let started = std::time::Instant::now();
    cluster
        .sql("INSERT INTO t_load SELECT g, md5(g::text) FROM generate_series(1, 1000000) g")
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1_000_000, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let peak = peak_rss_kb(walstream.pid()).unwrap_or(0);
    eprintln!(
        "1,000,000-row transaction: in the stream {elapsed:?} after the INSERT began; \
         walstream peak RSS {} MB",
        peak / 1024
    );
    let mut stream = js.get_stream(STREAM).await?;
    assert_eq!(stream.info().await?.state.messages, 1_000_000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_stops_walstream_and_is_never_recreated() -> anyhow::Result<()> {
    let (cluster, config, mut walstream) = streaming_load_table().await?;
    write_load(cluster.db_url(), 1, 5, 10, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 50, Duration::from_secs(30)).await?;
    let client = cluster.client().await?;
    let slot_exists = || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walstream'",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, i64>(0) == 1)
    };

    // Dropped while walstream streams: its walsender is terminated first, as a DBA would, and
    // again while walstream keeps reconnecting, until the drop gets in.
    let mut dropped = false;
    for _ in 0..100 {
        client
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                 WHERE slot_name = 'walstream' AND active_pid IS NOT NULL",
            )
            .await?;
        if client
            .batch_execute("SELECT pg_drop_replication_slot('walstream')")
            .await
            .is_ok()
        {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "could not drop the slot");
    let status = walstream
        .wait_exit(Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    assert!(!status.success(), "a lost slot is an error exit");
    assert_log_shows(&cluster, "replication slot walstream no longer exists", 1)?;
    assert_log_shows(&cluster, "walstream setup", 1)?;
    assert!(
        !slot_exists().await?,
        "walstream must not recreate the slot"
    );

    // Started again with its checkpoint and stream history, it refuses rather than create a
    // slot that would skip the changes made in between.
    let restart_log = cluster.dir.path().join("restart.log");
    let mut restarted = Walstream::start(&config, &restart_log)?;
    let status = restarted
        .wait_exit(Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: it kept running without its slot"))?;
    assert!(!status.success());
    let log = std::fs::read_to_string(&restart_log)?;
    assert!(log.contains("no longer exists"), "{log}");
    assert!(
        !slot_exists().await?,
        "walstream must not recreate the slot at start either"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_stops_walstream_with_the_recovery() -> anyhow::Result<()> {
    let (cluster, config, mut walstream) = streaming_load_table().await?;
    write_load(cluster.db_url(), 1, 5, 10, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 50, Duration::from_secs(30)).await?;
    let client = cluster.client().await?;
    let wal_status = || async {
        let row = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walstream'",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, Option<String>>(0))
    };

    // walstream frozen (SIGSTOP) while the slot falls further behind than the server keeps:
    // the next checkpoint invalidates the slot and ends its walsender.
    // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement query.
    client
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    let pid = walstream.pid().to_string();
    Command::new("kill").args(["-STOP", &pid]).status()?;
    let mut lost = false;
    for _ in 0..20 {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS t_filler (v TEXT);
                 INSERT INTO t_filler SELECT md5(g || random()::text) FROM generate_series(1, 50000) g;
                 SELECT pg_switch_wal();",
            )
            .await?;
        client.batch_execute("CHECKPOINT").await?;
        if wal_status().await?.as_deref() == Some("lost") {
            lost = true;
            break;
        }
    }
    Command::new("kill").args(["-CONT", &pid]).status()?;
    assert!(
        lost,
        "the slot was not invalidated: {:?}",
        wal_status().await?
    );

    let status = walstream
        .wait_exit(Duration::from_secs(60))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    assert!(!status.success(), "an invalidated slot is an error exit");
    assert_log_shows(&cluster, "was invalidated (wal_status = lost)", 1)?;
    assert_log_shows(&cluster, "walstream setup", 1)?;

    // Started again, it refuses the same way instead of streaming from a slot with a hole.
    let restart_log = cluster.dir.path().join("restart.log");
    let mut restarted = Walstream::start(&config, &restart_log)?;
    let status = restarted
        .wait_exit(Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: it kept running on an invalidated slot"))?;
    assert!(!status.success());
    let log = std::fs::read_to_string(&restart_log)?;
    assert!(log.contains("wal_status = lost"), "{log}");
    Ok(())
}

/// A second instance's config: its own checkpoint directory (empty) and HTTP port, the same
/// slot, stream and lease.
fn standby_config(
    cluster: &Cluster,
    active: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, u16)> {
    let text = std::fs::read_to_string(active)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let checkpoint = cluster.log_path().with_file_name("standby-checkpoint");
    let text = text
        .lines()
        .map(|line| {
            if line.starts_with("path = ") {
                format!("path = \"{}\"", checkpoint.display())
            } else if line.starts_with("listen = \"127.0.0.1:") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = active.with_file_name("standby.toml");
    std::fs::write(&path, text)?;
    Ok((path, port))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_a_sigkilled_active_instance_with_nothing_lost_or_duplicated(
) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "[ha]\nenabled = true\nlease_secs = 3\n")?;
    let mut active = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let (standby_config, standby_port) = standby_config(&cluster, &config)?;
    let standby_log = cluster.log_path().with_file_name("standby.log");
    let _standby = Walstream::start(&standby_config, &standby_log)?;
    eventually(
        Duration::from_secs(20),
        "the standby to stand by",
        || async {
            http_get(standby_port, "/health")
                .await
                .is_ok_and(|(status, body)| status == 200 && body.contains(r#""role":"standby""#))
        },
    )
    .await
    .inspect_err(|_| dump_log(&standby_log))?;

    let writer = tokio::spawn(write_load(
        cluster.db_url(),
        1,
        300,
        10,
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    active.kill();
    let killed = std::time::Instant::now();
    let js = cluster.jetstream().await?;
    let before = js.get_stream(STREAM).await?.info().await?.state.messages;
    eventually(Duration::from_secs(30), "the standby to publish", || {
        let js = js.clone();
        async move {
            let Ok(mut stream) = js.get_stream(STREAM).await else {
                return false;
            };
            stream
                .info()
                .await
                .is_ok_and(|info| info.state.messages > before)
        }
    })
    .await
    .inspect_err(|_| dump_log(&standby_log))?;
    println!(
        "the standby published {:?} after the active instance was killed",
        killed.elapsed()
    );
    let committed = writer.await??;
    assert_eq!(committed.len(), 3000);
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 3000);
    let standby_text = std::fs::read_to_string(&standby_log)?;
    assert!(
        standby_text.contains("lease acquired: streaming"),
        "{standby_text}"
    );
    let (_, health) = http_get(standby_port, "/health").await?;
    assert!(health.contains(r#""role":"active""#), "{health}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_or_a_damaged_checkpoint_stops_walstream_clearly_and_loses_nothing(
) -> anyhow::Result<()> {
    let (cluster, config, mut streamer) = streaming_load_table().await?;
    write_load(cluster.db_url(), 1, 10, 10, Duration::ZERO).await?;
    assert_stream_matches_table(&cluster).await?;
    streamer.terminate(Duration::from_secs(30))?;

    // The checkpoint's disk full: a 2 MB tmpfs holding the store, filled up (CI runs as root).
    let checkpoint = cluster.dir.path().join("checkpoint");
    let saved = cluster.dir.path().join("checkpoint-saved");
    std::fs::rename(&checkpoint, &saved)?;
    let disk = Tmpfs::mount(&checkpoint, "2m")?;
    let filler = checkpoint.join("filler");
    disk.fill(&filler);
    write_load(cluster.db_url(), 101, 10, 10, Duration::ZERO).await?;
    let output = walstream(&["stream"], &config)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("No space left") && stderr.contains("The disk is full"),
        "{stderr}"
    );
    // Space again: it resumes where it stood.
    std::fs::remove_file(&filler)?;
    let mut streamer = Walstream::start(&config, &cluster.log_path())?;
    assert_stream_matches_table(&cluster).await?;
    streamer.terminate(Duration::from_secs(30))?;
    drop(disk);

    // A damaged store: a clear error with the way out, which loses and repeats nothing.
    std::fs::remove_dir_all(&checkpoint)?;
    std::fs::rename(&saved, &checkpoint)?;
    std::fs::write(checkpoint.join("CURRENT"), b"garbage\n")?;
    write_load(cluster.db_url(), 201, 10, 10, Duration::ZERO).await?;
    let output = walstream(&["stream"], &config)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Move the directory away"), "{stderr}");
    std::fs::remove_dir_all(&checkpoint)?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 300);
    Ok(())
}
