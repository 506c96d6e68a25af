//! Recovery: walstream killed (-9) or stopped (SIGTERM), NATS down, PostgreSQL restarted, a
//! dead link, an empty or damaged checkpoint, a standby taking over. After each, the stream
//! holds every committed change exactly once and in commit order.

mod harness;

use harness::load::*;
use harness::*;
use std::time::Duration;

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
