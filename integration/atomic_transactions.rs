//! `nats.transactions = "atomic"`: each transaction stored as one atomic batch (nats-server
//! 2.12.1+), so the stream never ends inside a transaction, not even after walstream is
//! SIGKILLed mid-transaction; one larger than a batch is stored in several and says so; older
//! servers refuse with the reason. Run against each server of the matrix (scripts/test-matrix).

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use harness::load::*;
use harness::*;
use walstream::pipeline::event::HEADER_TX_LAST;
use walstream::pipeline::sink::HEADER_TX_SPLIT;

/// A config for `t_load` with atomic transactions and `max_inflight` events in flight.
fn atomic_config(cluster: &Cluster, max_inflight: usize) -> anyhow::Result<PathBuf> {
    let path = cluster.config(&["public.t_load"], "")?;
    let text = std::fs::read_to_string(&path)?.replace(
        "ack_timeout_secs = 2\n",
        &format!(
            "ack_timeout_secs = 2\ntransactions = \"atomic\"\nmax_inflight = {max_inflight}\n"
        ),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The server's version, or `None` after saying why the test does not run on it: it has no
/// atomic batches with message ids, and walstream must refuse to start.
async fn atomic_server(cluster: &Cluster, config: &Path) -> anyhow::Result<Option<String>> {
    let version = cluster.jetstream().await?.client().server_info().version;
    let check = walstream(&["check"], config)?;
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    if walstream::nats::atomic_batches_with_ids(&version) {
        assert!(said.contains("publishing: atomic transactions"), "{said}");
        return Ok(Some(version));
    }
    assert!(
        said.contains("nats.transactions = \"atomic\" needs nats-server 2.12.1 or later"),
        "`walstream check` on nats-server {version}: {said}"
    );
    let mut walstream = Walstream::start(config, &cluster.log_path())?;
    let status = walstream.wait_exit(Duration::from_secs(60)).await?;
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        !status.success(),
        "walstream started on nats-server {version}"
    );
    assert!(
        log.contains("nats.transactions = \"atomic\" needs nats-server 2.12.1 or later"),
        "{log}"
    );
    eprintln!("nats-server {version}: atomic transactions refused with the reason, as they must");
    Ok(None)
}

fn header_is_true(message: &Stored, name: &str) -> bool {
    message
        .headers
        .get(name)
        .is_some_and(|value| value.as_str() == "true")
}

/// The stream's end once it stops moving, and whether its message ends a transaction.
async fn settled_end(js: &jetstream::Context) -> anyhow::Result<(u64, bool)> {
    let mut stream = js.get_stream("fraiseql_events").await?;
    let mut last = stream.info().await?.state.last_sequence;
    let mut still_since = std::time::Instant::now();
    while still_since.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = stream.info().await?.state.last_sequence;
        if now != last {
            (last, still_since) = (now, std::time::Instant::now());
        }
    }
    if last == 0 {
        return Ok((0, true));
    }
    let message = stream.get_raw_message(last).await?;
    let ends = message
        .headers
        .get(HEADER_TX_LAST)
        .is_some_and(|value| value.as_str() == "true");
    Ok((last, ends))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_never_ends_inside_a_transaction_even_when_walstream_is_killed(
) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = atomic_config(&cluster, 1024)?;
    let Some(version) = atomic_server(&cluster, &config).await? else {
        return Ok(());
    };
    let mut walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let js = cluster.jetstream().await?;
    // Transactions of 1, 40 and 400 rows, with walstream SIGKILLed under them four times.
    let url = cluster.db_url();
    let writer = tokio::spawn(async move {
        let mut committed = write_load(url.clone(), 1, 100, 1, Duration::ZERO).await?;
        committed.extend(write_load(url.clone(), 101, 100, 40, Duration::from_millis(2)).await?);
        committed.extend(write_load(url, 4_101, 30, 400, Duration::from_millis(5)).await?);
        anyhow::Ok(committed)
    });
    // JetStream writes a batch's messages one after another, so a reader can meet the end
    // inside one for an instant; what must never happen is an end that stays there.
    let mut inside = Vec::new();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(500 + 250 * round)).await;
        walstream.kill();
        let (end, ends_a_transaction) = settled_end(&js).await?;
        if !ends_a_transaction {
            inside.push(end);
        }
        walstream = Walstream::start(&config, &cluster.log_path())?;
    }
    let committed = writer.await??;
    assert_eq!(committed.len(), 100 + 100 * 40 + 30 * 400);
    let messages = assert_stream_matches_table(&cluster).await?;
    assert!(
        inside.is_empty(),
        "walstream killed, the stream stayed inside a transaction at sequences {inside:?}"
    );
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        log.contains("publishing=\"atomic transactions\""),
        "walstream did not publish atomic transactions on nats-server {version}"
    );
    assert_log_shows(&cluster, "starting replication", 5)?;
    // Transactions of at most 400 rows fit in a batch: none is split, each ends once.
    assert!(messages.iter().all(|m| !header_is_true(m, HEADER_TX_SPLIT)));
    let ends = messages
        .iter()
        .filter(|m| header_is_true(m, HEADER_TX_LAST))
        .count();
    assert_eq!(ends, 100 + 100 + 30);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_larger_than_a_batch_is_stored_in_several_and_marked() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    // 100 events in flight: batches of at most 100.
    let config = atomic_config(&cluster, 100)?;
    if atomic_server(&cluster, &config).await?.is_none() {
        return Ok(());
    }
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let url = cluster.db_url();
    write_load(url.clone(), 1, 3, 1, Duration::ZERO).await?;
    write_load(url.clone(), 4, 1, 250, Duration::ZERO).await?;
    write_load(url, 254, 3, 1, Duration::ZERO).await?;
    let messages = assert_stream_matches_table(&cluster).await?;
    assert_eq!(messages.len(), 256);
    let split: Vec<bool> = messages
        .iter()
        .map(|m| header_is_true(m, HEADER_TX_SPLIT))
        .collect();
    let expected: Vec<bool> = (0..256).map(|i| (3..253).contains(&i)).collect();
    assert_eq!(
        split, expected,
        "Walstream-Tx-Split on exactly the large transaction"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| header_is_true(m, HEADER_TX_LAST))
            .count(),
        7
    );
    assert_eq!(
        metric(&cluster, "walstream_split_transactions_total").await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn another_publisher_never_lands_inside_a_transaction() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    // Batches of at most 50 events, so many batches; no transaction larger than a batch (one
    // that is may have another message between its batches).
    let config = atomic_config(&cluster, 50)?;
    if atomic_server(&cluster, &config).await?.is_none() {
        return Ok(());
    }
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let js = cluster.jetstream().await?;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Another client publishing into the stream's subjects all the while, acknowledged one
    // by one.
    let intruder = {
        let (js, writing) = (js.clone(), writing.clone());
        tokio::spawn(async move {
            let mut stored = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                js.publish("fraiseql.mutation.Other.INSERT", r#"{"other":true}"#.into())
                    .await?
                    .await?;
                stored += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            anyhow::Ok(stored)
        })
    };
    let url = cluster.db_url();
    let mut committed = write_load(url.clone(), 1, 600, 3, Duration::ZERO).await?;
    committed.extend(write_load(url, 1_801, 40, 45, Duration::ZERO).await?);
    let ours_expected = committed.len() as u64;
    // Both done before the stream is read: the intruder's count is then final.
    let stored_by_intruder = loop {
        let mut stream = js.get_stream("fraiseql_events").await?;
        if stream.info().await?.state.messages >= ours_expected {
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
            break intruder.await??;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_for_messages(
        &js,
        ours_expected + stored_by_intruder,
        Duration::from_secs(120),
    )
    .await?;
    let messages = read_stream(&js).await?;
    let (ours, others): (Vec<Stored>, Vec<Stored>) = messages
        .into_iter()
        .partition(|m| m.message_id.starts_with("walstream:"));
    assert_eq!(others.len() as u64, stored_by_intruder);
    assert_exactly_once_in_order(&ours);
    let streamed: std::collections::BTreeSet<i64> = ours
        .iter()
        .map(|m| m.body["data"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(
        streamed,
        table_ids(&cluster).await?,
        "the stream and the table differ"
    );
    // Every transaction's events stand one after another: nothing between them.
    let mut sequences: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for message in &ours {
        sequences
            .entry(&message.xid)
            .or_default()
            .push(message.sequence);
    }
    for (xid, sequences) in &sequences {
        let (first, last) = (sequences[0], sequences[sequences.len() - 1]);
        assert_eq!(
            last - first + 1,
            sequences.len() as u64,
            "transaction {xid} stored at {first}..={last} with another message inside"
        );
    }
    assert_eq!(sequences.len(), 600 + 40);
    // The other client's messages landed among walstream's, not all before or after.
    let (first_ours, last_ours) = (ours[0].sequence, ours[ours.len() - 1].sequence);
    let among = others
        .iter()
        .filter(|m| (first_ours..last_ours).contains(&m.sequence))
        .count();
    assert!(
        among > 0,
        "no other message landed among walstream's events"
    );
    assert!(metric(&cluster, "walstream_other_publishers_messages_total").await? >= 1.0);
    Ok(())
}
