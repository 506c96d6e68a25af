//! The fault suite's other publisher: another client writing into walstream's stream at random
//! moments, as the seeds' workers, an outbox bridge or an operator with `nats pub` do: messages
//! without an id, with an id of their own, and copies of walstream's own messages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream;
use async_nats::HeaderMap;

use super::harness::STREAM;

/// Each of its messages carries its number here: how the oracle tells them from walstream's
/// (walstream itself never reads it).
pub const MARK: &str = "Fault-Suite-Other";

/// Subjects the stream covers: one of walstream's own, one no table uses.
const SUBJECTS: [&str; 2] = [
    "fraiseql.mutation.TA.INSERT",
    "fraiseql.mutation.Other.CUSTOM",
];

/// What the other publisher did.
#[derive(Debug, Default)]
pub struct Published {
    /// Numbers of every message it tried to publish.
    pub attempted: BTreeSet<u64>,
    /// Numbers JetStream acknowledged as stored: each must be in the stream.
    pub stored: BTreeSet<u64>,
    /// Numbers published without a `Nats-Msg-Id`: JetStream stores those at least once (a
    /// cluster re-applying a publish across a leader change can store one twice); every other
    /// message must be there at most once.
    pub without_id: BTreeSet<u64>,
    /// Copies of walstream's messages JetStream dropped as duplicates (its dedup window).
    pub copies_dropped: u64,
    pub kinds: BTreeMap<&'static str, u64>,
}

/// Publishes until `stop`, every 50 to 400 ms, reconnecting through any NATS outage.
/// `nats_urls` is comma-separated (a cluster's nodes).
pub async fn publish(nats_urls: String, seed: u64, stop: Arc<AtomicBool>) -> Published {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x0a11_0a11);
    let mut published = Published::default();
    let servers: Vec<async_nats::ServerAddr> = nats_urls
        .split(',')
        .map(|url| url.parse())
        .collect::<Result<_, _>>()
        .expect("the harness gives valid NATS URLs");
    let client = loop {
        if stop.load(Ordering::SeqCst) {
            return published;
        }
        match async_nats::connect(servers.clone()).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    let mut number = 0;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
        number += 1;
        let (kind, mut headers, payload) = match rng.u32(0..3) {
            0 => ("without an id", HeaderMap::new(), bytes::Bytes::new()),
            1 => {
                let mut headers = HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, format!("outbox:{number}").as_str());
                ("with an id of its own", headers, bytes::Bytes::new())
            }
            _ => match walstreams_last_message(&js).await {
                Some((headers, payload)) => ("a copy of walstream's", headers, payload),
                None => ("without an id", HeaderMap::new(), bytes::Bytes::new()),
            },
        };
        headers.insert(MARK, number.to_string().as_str());
        let payload = if payload.is_empty() {
            format!(r#"{{"other": {number}}}"#).into()
        } else {
            payload
        };
        if headers.get(NATS_MESSAGE_ID).is_none() {
            published.without_id.insert(number);
        }
        *published.kinds.entry(kind).or_default() += 1;
        published.attempted.insert(number);
        let subject = SUBJECTS[rng.usize(..SUBJECTS.len())];
        let sent = js.publish_with_headers(subject, headers, payload).await;
        let Ok(ack) = sent else { continue };
        match ack.await {
            Ok(ack) if ack.duplicate => published.copies_dropped += 1,
            Ok(_) => {
                published.stored.insert(number);
            }
            // Not answered (NATS down, a timeout): stored or not, it may be there once.
            Err(_) => {}
        }
    }
    published
}

/// The headers and payload of the stream's last message when walstream published it.
async fn walstreams_last_message(js: &jetstream::Context) -> Option<(HeaderMap, bytes::Bytes)> {
    let mut stream = js.get_stream(STREAM).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    let message = stream.get_raw_message(last).await.ok()?;
    let id = message.headers.get(NATS_MESSAGE_ID)?;
    let own = id.as_str().starts_with("walstream:") && message.headers.get(MARK).is_none();
    own.then_some((message.headers, message.payload))
}
