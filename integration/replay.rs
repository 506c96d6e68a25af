//! Replays: `walstream reset-lsn` re-delivers marked events inside the retained window,
//! refuses what is outside it, and a replay killed midway resumes exactly.

mod harness;

use harness::output::*;
use harness::*;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

const TABLE: &str = "CREATE TABLE t_replay (id INT PRIMARY KEY, note TEXT NOT NULL)";

async fn insert_rows(cluster: &Cluster, ids: std::ops::RangeInclusive<i32>) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    for id in ids {
        client
            .execute(
                "INSERT INTO t_replay VALUES ($1, 'row ' || $1::int)",
                &[&id],
            )
            .await?;
    }
    Ok(())
}

/// Waits until no walsender streams the slot any more.
async fn wait_slot_released(cluster: &Cluster) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    eventually(
        Duration::from_secs(20),
        "the slot to be released",
        || async {
            walstream::postgres::slot_info(&client, "walstream")
                .await
                .ok()
                .flatten()
                .is_some_and(|slot| !slot.active)
        },
    )
    .await
}

/// `reset-lsn <lsn> --json`: the request, or the error output.
fn reset_lsn(config: &std::path::Path, lsn: &str) -> anyhow::Result<Result<Value, String>> {
    let output = walstream(&["reset-lsn", lsn, "--json"], config)?;
    if !output.status.success() {
        return Ok(Err(stderr(&output)));
    }
    Ok(Ok(serde_json::from_slice(&output.stdout)?))
}

fn is_replayed(message: &Stored) -> bool {
    message.body["replay"] == true
}

fn is_marker(message: &Stored) -> bool {
    message.body["event"] == "REPLAY"
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_lsn_redelivers_marked_events_inside_the_retained_window() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config_with(
        &cluster.db_url(),
        &["public.t_replay"],
        "receive_timeout_secs = 30\nreplay_retention = \"1GB\"",
        "",
    )?;
    setup(&config)?;
    insert_rows(&cluster, 1..=10).await?;
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 10, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let first = read_stream(&js).await?;

    let refused = reset_lsn(&config, &first[3].lsn)?.expect_err("walstream is streaming");
    assert!(refused.contains("is being streamed"), "{refused}");

    walstream_process.terminate(Duration::from_secs(30))?;
    wait_slot_released(&cluster).await?;
    let request = reset_lsn(&config, &first[3].lsn)?.map_err(anyhow::Error::msg)?;
    assert_eq!(request["marker_sequence"], 11, "{request}");
    let replay_id = request["replay"].as_u64().expect("a replay id");
    let status = walstream(&["status", "--json"], &config)?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status["replay"]["state"], "requested", "{status}");
    assert_eq!(status["replay"]["id"], replay_id, "{status}");

    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    // 10 first deliveries, the marker, 7 replayed, then 2 new rows.
    wait_for_messages(&js, 18, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    insert_rows(&cluster, 11..=12).await?;
    wait_for_messages(&js, 20, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    assert_eq!(messages.len(), 20);
    assert!(is_marker(&messages[10]), "{:?}", messages[10]);
    for (replayed, original) in messages[11..18].iter().zip(&first[3..]) {
        assert!(is_replayed(replayed), "{replayed:?}");
        assert_eq!(replayed.body["data"], original.body["data"]);
        assert_eq!(replayed.position(), original.position());
        assert_eq!(
            replayed.message_id,
            format!("{}:r{replay_id}", original.message_id)
        );
    }
    for live in &messages[18..] {
        assert!(
            !is_replayed(live) && !live.message_id.contains(":r"),
            "{live:?}"
        );
    }
    assert_eq!(messages[18].body["data"]["id"], 11);
    let status = walstream(&["status", "--json"], &config)?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(
        status["replay"],
        Value::Null,
        "the replay is over: {status}"
    );

    // `seek` finds first deliveries, not their replays.
    let output = walstream(&["seek", "--json", "--lsn", &first[3].lsn], &config)?;
    let found: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(found["sequence"], 4, "{found}");

    // A restart after the replay does not replay again.
    walstream_process.terminate(Duration::from_secs(30))?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    insert_rows(&cluster, 13..=13).await?;
    wait_for_messages(&js, 21, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = read_stream(&js).await?;
    assert_eq!(messages.len(), 21, "{:?}", &messages[20..]);
    assert_eq!(messages[20].body["data"]["id"], 13);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_lsn_outside_the_retained_window_is_refused_with_the_way_out() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config(&["public.t_replay"], "")?;
    setup(&config)?;
    insert_rows(&cluster, 1..=3).await?;
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 3, Duration::from_secs(30)).await?;
    walstream_process.terminate(Duration::from_secs(30))?;
    wait_slot_released(&cluster).await?;
    let messages = read_stream(&js).await?;

    let refused = reset_lsn(&config, &messages[0].lsn)?.expect_err("outside the window");
    for expected in ["confirmed up to", "backfill", "replay_retention"] {
        assert!(refused.contains(expected), "{expected}: {refused}");
    }
    let past_the_end = reset_lsn(&config, "FF/0")?.expect_err("nothing to replay");
    assert!(past_the_end.contains("nothing to replay"), "{past_the_end}");
    let garbage = reset_lsn(&config, "yesterday")?.expect_err("not an LSN");
    assert!(garbage.contains("is not an LSN"), "{garbage}");
    assert_eq!(
        read_stream(&js).await?.len(),
        3,
        "a refused reset writes nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_midway_resumes_without_losing_or_repeating_events() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(TABLE).await?;
    let config = cluster.config_with(
        &cluster.db_url(),
        &["public.t_replay"],
        "receive_timeout_secs = 30\nreplay_retention = \"1h\"",
        "",
    )?;
    setup(&config)?;
    // 200 transactions of 200 rows.
    cluster
        .sql(
            "DO $$ BEGIN
                 FOR b IN 0..199 LOOP
                     INSERT INTO t_replay SELECT b * 200 + i, 'x' FROM generate_series(1, 200) i;
                     COMMIT;
                 END LOOP;
             END $$",
        )
        .await?;
    const ROWS: u64 = 40_000;
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, ROWS, Duration::from_secs(120))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    walstream_process.terminate(Duration::from_secs(30))?;
    wait_slot_released(&cluster).await?;
    let stream = js.get_stream(STREAM).await?;
    let first = stream.get_raw_message(1).await?;
    let from = first
        .headers
        .get("Walstream-Lsn")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    reset_lsn(&config, &from)?.map_err(anyhow::Error::msg)?;

    // SIGKILL partway through the replay, then start again.
    let mut walstream_process = Walstream::start(&config, &cluster.log_path())?;
    wait_for_messages(&js, ROWS + 1 + ROWS / 3, Duration::from_secs(120)).await?;
    walstream_process.kill();
    let at_kill = js.get_stream(STREAM).await?.info().await?.state.messages;
    assert!(
        at_kill < 2 * ROWS + 1,
        "the replay had finished before the kill ({at_kill} messages); the test needs more rows"
    );
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_messages(&js, 2 * ROWS + 1, Duration::from_secs(120))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let messages = read_stream(&js).await?;
    assert_eq!(messages.len() as u64, 2 * ROWS + 1, "nothing repeated");
    let originals = &messages[..ROWS as usize];
    let replayed = &messages[ROWS as usize + 1..];
    let mut ids = HashSet::new();
    for (again, original) in replayed.iter().zip(originals) {
        assert!(is_replayed(again), "{again:?}");
        assert_eq!(again.position(), original.position(), "in order, none lost");
        assert!(ids.insert(again.message_id.clone()));
    }
    Ok(())
}
