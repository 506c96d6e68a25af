//! Large transactions and large rows: 100k and a million rows in one transaction stream
//! through in bounded memory; a row over max_payload stops walstream until it is fixed.

mod harness;

use harness::load::*;
use harness::*;
use std::time::Duration;

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
#[ignore = "a minute or two; run by hand: cargo test --release --test large_transactions -- --ignored"]
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
