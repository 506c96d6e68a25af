//! The replication slot: an idle publication does not hold WAL back; a dropped or invalidated
//! slot stops walstream with the way to recover, and is never silently recreated.

mod harness;

use harness::load::*;
use harness::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    assert_log_shows(&cluster, "was invalidated (wal_status = lost", 1)?;
    assert_log_shows(&cluster, "max_slot_wal_keep_size", 1)?;
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

// PostgreSQL 18 invalidates a slot no walsender used for idle_replication_slot_timeout; the
// slot then looks healthy by wal_status, and only invalidation_reason says why it is dead.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_invalidated_for_idling_stops_walstream_naming_the_reason() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    if cluster.postgres_version().await? < 180000 {
        eprintln!("not run: idle_replication_slot_timeout is PostgreSQL 18's (scripts/test-matrix runs it there)");
        return Ok(());
    }
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let mut streamer = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    write_load(cluster.db_url(), 1, 2, 5, Duration::ZERO).await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 10, Duration::from_secs(30)).await?;
    streamer.terminate(Duration::from_secs(30))?;

    let client = cluster.client().await?;
    client
        .batch_execute("ALTER SYSTEM SET idle_replication_slot_timeout = '1s'")
        .await?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    let mut reason = None;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.batch_execute("CHECKPOINT").await?;
        let row = client
            .query_one(
                "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'walstream'",
                &[],
            )
            .await?;
        reason = row.get::<_, Option<String>>(0);
        if reason.is_some() {
            break;
        }
    }
    assert_eq!(reason.as_deref(), Some("idle_timeout"));

    let restart_log = cluster.dir.path().join("restart.log");
    let mut restarted = Walstream::start(&config, &restart_log)?;
    let status = restarted
        .wait_exit(Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: it kept running on an invalidated slot"))?;
    assert!(!status.success(), "an invalidated slot is an error exit");
    let log = std::fs::read_to_string(&restart_log)?;
    assert!(
        log.contains("invalidation_reason = idle_timeout")
            && log.contains("idle_replication_slot_timeout")
            && log.contains("walstream setup"),
        "{log}"
    );
    let check = walstream(&["check"], &config)?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        !check.status.success() && said.contains("idle_timeout"),
        "{said}"
    );
    Ok(())
}
