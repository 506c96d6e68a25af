//! A steady write load on `t_load` and the checks of the stream against the table, for the
//! recovery, slot and large-transaction tests.

use super::*;
use std::collections::BTreeSet;
use std::time::Duration;

pub const TABLE: &str = "CREATE TABLE t_load (id BIGINT PRIMARY KEY, payload TEXT NOT NULL);";

/// Commits `transactions` transactions of `rows_per_tx` inserts each, numbered from `first_id`,
/// reconnecting when PostgreSQL restarts. Returns the ids it committed.
pub async fn write_load(
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
pub async fn streaming_load_table() -> anyhow::Result<(Cluster, std::path::PathBuf, Walstream)> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_load"], "")?;
    let walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    Ok((cluster, config, walstream))
}

/// Ids actually in the table: the truth the stream is checked against.
pub async fn table_ids(cluster: &Cluster) -> anyhow::Result<BTreeSet<i64>> {
    let client = cluster.client().await?;
    let rows = client.query("SELECT id FROM t_load", &[]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Asserts that the walstream log shows `needle` at least `times` times: the fault really hit.
pub fn assert_log_shows(cluster: &Cluster, needle: &str, times: usize) -> anyhow::Result<()> {
    let log = std::fs::read_to_string(cluster.log_path())?;
    let found = log.matches(needle).count();
    if found < times {
        dump_log(&cluster.log_path());
        anyhow::bail!("the log shows {needle:?} {found} times, expected at least {times}");
    }
    Ok(())
}

/// Waits until the stream holds one INSERT per row of the table, then checks the invariants.
pub async fn assert_stream_matches_table(cluster: &Cluster) -> anyhow::Result<Vec<Stored>> {
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
