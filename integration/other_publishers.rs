//! Other clients publishing into walstream's stream: walstream's own events stay exactly once
//! and in WAL order beside their messages, live and across a restart, and nothing another
//! client wrote is ever taken for one of walstream's events.

mod harness;

use std::time::Duration;

use async_nats::{jetstream, HeaderMap};
use harness::*;
use serde_json::Value;

const ORDERS: &str = "
    CREATE TABLE tb_order (
        pk_order BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        identifier TEXT NOT NULL
    )";

fn own(messages: &[Stored]) -> Vec<Stored> {
    messages
        .iter()
        .filter(|m| m.message_id.starts_with("walstream:"))
        .cloned()
        .collect()
}

fn identifiers(messages: &[Stored]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            m.body["data"]["identifier"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

/// Publishes as another client would, returning the stream sequence JetStream answered.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    body: &str,
) -> anyhow::Result<(u64, bool)> {
    let ack = js
        .publish_with_headers(subject.to_owned(), headers, body.to_owned().into())
        .await?
        .await?;
    Ok((ack.sequence, ack.duplicate))
}

async fn insert(cluster: &Cluster, identifier: &str) -> anyhow::Result<()> {
    cluster
        .sql(&format!(
            "INSERT INTO tb_order (identifier) VALUES ('{identifier}')"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn other_clients_messages_interleave_and_no_change_is_lost() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let config = cluster.config(&["public.tb_order"], "")?;
    setup(&config)?;
    let mut streaming = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    let result = async {
        // Issue 16, step by step: one order, a plain publish without an id, two more orders.
        insert(&cluster, "before-1").await?;
        wait_for_messages(&js, 1, Duration::from_secs(30)).await?;
        let (foreign, _) = publish(
            &js,
            "fraiseql.mutation.Order.INSERT",
            HeaderMap::new(),
            r#"{"hand":"published"}"#,
        )
        .await?;
        assert_eq!(foreign, 2);
        insert(&cluster, "after-hand-1").await?;
        insert(&cluster, "after-hand-2").await?;
        wait_for_messages(&js, 4, Duration::from_secs(30)).await?;
        let messages = read_stream(&js).await?;
        assert_eq!(messages[1].body, serde_json::json!({"hand": "published"}));
        let ours = own(&messages);
        assert_eq!(
            identifiers(&ours),
            ["before-1", "after-hand-1", "after-hand-2"]
        );
        assert_exactly_once_in_order(&ours);
        let (status, health) = http_get(cluster.http_port, "/health").await?;
        assert_eq!(status, 200, "{health}");
        assert!(
            metric(&cluster, "walstream_other_publishers_messages_total").await? >= 1.0,
            "the other client's message is counted"
        );

        // Another id, walstream's headers under another id, and a copy of walstream's own
        // message (JetStream's dedup window drops the copy).
        let mut foreign_id = HeaderMap::new();
        foreign_id.insert("Nats-Msg-Id", "outbox:42");
        publish(&js, "fraiseql.mutation.Order.UPDATE", foreign_id, "{}").await?;
        let last = ours.last().expect("three events");
        let mut lookalike = HeaderMap::new();
        lookalike.insert("Nats-Msg-Id", "intruder:1");
        lookalike.insert("Walstream-Xid", last.xid.as_str());
        lookalike.insert("Walstream-Lsn", "FFFFFFFF/0");
        lookalike.insert("Walstream-Seq", "0");
        publish(&js, "fraiseql.mutation.Order.INSERT", lookalike, "{}").await?;
        let mut copy = HeaderMap::new();
        copy.insert("Nats-Msg-Id", last.message_id.as_str());
        copy.insert("Walstream-Xid", last.xid.as_str());
        copy.insert("Walstream-Lsn", last.lsn.as_str());
        copy.insert("Walstream-Seq", last.seq.to_string().as_str());
        let (_, duplicate) = publish(&js, "fraiseql.mutation.Order.INSERT", copy, "{}").await?;
        assert!(duplicate, "JetStream drops a copy inside the dedup window");
        insert(&cluster, "after-lookalike").await?;
        wait_for_messages(&js, 7, Duration::from_secs(30)).await?;

        // Killed, with changes committed and other messages published while it is down: the
        // restart finds its last event behind the others and publishes each change once.
        streaming.kill();
        insert(&cluster, "while-down").await?;
        publish(
            &js,
            "fraiseql.mutation.Order.DELETE",
            HeaderMap::new(),
            "{}",
        )
        .await?;
        let check = walstream(&["check"], &config)?;
        let text = String::from_utf8_lossy(&check.stdout).to_string();
        assert!(
            text.contains("WARN stream fraiseql_events: 1 messages after walstream's last event"),
            "check warns of the other client's messages:\n{text}"
        );
        let status = walstream(&["status", "--json"], &config)?;
        let status: Value = serde_json::from_slice(&status.stdout)?;
        assert_eq!(status["stream"]["other_messages_after_last_event"], 1);
        assert_eq!(status["stream"]["last_lsn"], ours_last_lsn(&js).await?);

        streaming = Walstream::start(&config, &cluster.log_path())?;
        insert(&cluster, "after-restart").await?;
        wait_for_messages(&js, 10, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let messages = read_stream(&js).await?;
        let ours = own(&messages);
        assert_eq!(
            identifiers(&ours),
            [
                "before-1",
                "after-hand-1",
                "after-hand-2",
                "after-lookalike",
                "while-down",
                "after-restart"
            ]
        );
        assert_exactly_once_in_order(&ours);
        assert_eq!(messages.len(), 10, "four messages of other clients");

        // seek passes over other clients' messages: the first event at or after the LSN of
        // "while-down" is that event, not the message before it.
        let while_down = &ours[4];
        let seek = walstream(&["seek", "--lsn", &while_down.lsn, "--json"], &config)?;
        let seek: Value = serde_json::from_slice(&seek.stdout)?;
        assert_eq!(seek["sequence"], while_down.sequence);
        let last_event = walstream::lsn::parse_lsn(&ours[5].lsn).map_err(anyhow::Error::msg)?;
        let client = cluster.client().await?;
        eventually(Duration::from_secs(10), "the slot confirmed", || async {
            let confirmed = client
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots",
                    &[],
                )
                .await
                .ok()
                .and_then(|row| walstream::lsn::parse_lsn(&row.get::<_, String>(0)).ok());
            confirmed.is_some_and(|confirmed| confirmed >= last_event)
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    result.inspect_err(|_| dump_log(&cluster.log_path()))
}

async fn ours_last_lsn(js: &jetstream::Context) -> anyhow::Result<String> {
    let messages = read_stream(js).await?;
    Ok(own(&messages)
        .last()
        .map(|m| m.lsn.clone())
        .unwrap_or_default())
}
