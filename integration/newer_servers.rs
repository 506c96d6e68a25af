//! What newer nats-servers answer, provoked: a full ingest queue (2.11+, `429 too many
//! requests`, err_code 10167) makes walstream wait and re-send, and the stream still gets every
//! change exactly once, in order. Run against each server of the matrix (scripts/test-matrix).

mod harness;

use std::time::Duration;

use harness::load::*;
use harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_full_ingest_queue_is_waited_out_and_loses_nothing() -> anyhow::Result<()> {
    if nats_server_version()? < (2, 11) {
        eprintln!("not run: stream ingest limits are nats-server 2.11's (scripts/test-matrix runs it there)");
        return Ok(());
    }
    // A queue of 20 messages for a stream, against walstream's 1,024 publishes in flight (the
    // default), and a store that syncs every message to disk: the queue fills.
    let conf_dir = tempfile::tempdir()?;
    let conf = conf_dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        "jetstream {\n  max_buffered_msgs: 20\n  sync_interval: always\n}\n",
    )?;
    let conf = conf.display().to_string();
    let cluster = Cluster::start_with_nats_args(&["-c", &conf]).await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    write_load(cluster.db_url(), 1, 4, 1_000, Duration::ZERO).await?;
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 4_000);
    let refused = metric(
        &cluster,
        "walstream_publish_errors_total{kind=\"ingest_limit\"}",
    )
    .await?;
    assert!(
        refused > 0.0,
        "the server never answered 429: the test did not provoke what it is about"
    );
    Ok(())
}
