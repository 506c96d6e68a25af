//! `walstream tail`: follows the stream with an ephemeral ordered consumer and prints each
//! message as it arrives, compactly or as one JSON object a line, until Ctrl-C.

use std::io::Write as _;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::HeaderMap;
use futures::StreamExt as _;
use serde_json::{json, Value};

use crate::config::Config;
use crate::lsn::Lsn;
use crate::nats;
use crate::pipeline::history;

/// Where to start following.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Messages stored from now on.
    New,
    /// From this stream sequence.
    Sequence(u64),
    /// From walstream's first event committed at or after this LSN.
    Since(Lsn),
    /// The last this many messages, then new ones.
    Last(u64),
}

/// Prints the stream's messages on subjects matching `subject` (all when `None`) from `start`
/// until Ctrl-C or until stdout is closed.
pub async fn run(
    config: &Config,
    subject: Option<String>,
    start: Start,
    json: bool,
) -> anyhow::Result<()> {
    let name = &config.nats.stream_name;
    let slot = &config.replication.slot;
    let js = nats::jetstream_for_command(&config.nats).await?;
    let Some(mut stream) = nats::existing_stream(&js, name).await? else {
        anyhow::bail!(
            "stream {name} does not exist yet; walstream creates it at its first start \
             (stream, run or dev)"
        );
    };
    let state = stream.info().await?.state.clone();
    let deliver_policy = match start {
        Start::New => DeliverPolicy::New,
        Start::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        Start::Last(count) => DeliverPolicy::ByStartSequence {
            start_sequence: state
                .first_sequence
                .max((state.last_sequence + 1).saturating_sub(count)),
        },
        Start::Since(lsn) => {
            let found = history::first_where(
                &stream,
                slot,
                state.first_sequence,
                state.last_sequence,
                |meta| meta.position.commit_lsn >= lsn,
            )
            .await
            .with_context(|| format!("searching stream {name} for {lsn}"))?;
            DeliverPolicy::ByStartSequence {
                start_sequence: found.map_or(state.last_sequence + 1, |meta| meta.sequence),
            }
        }
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.unwrap_or_default(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot follow stream {name}"))?;
    let mut messages = consumer.messages().await?;
    let mut out = std::io::stdout().lock();
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message.map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?;
        let sequence = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?
            .stream_sequence;
        let headers = message.headers.clone().unwrap_or_default();
        let shown = Shown::new(sequence, &message.subject, &headers, &message.payload, slot);
        let line = if json {
            shown.json().to_string()
        } else {
            shown.compact()
        };
        // A closed pipe (`walstream tail | head`) ends the command, quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// One stored message as `tail` shows it.
struct Shown<'a> {
    sequence: u64,
    subject: &'a str,
    /// The event's WAL position, when walstream published it.
    position: Option<crate::pipeline::event::Position>,
    body: Value,
}

impl<'a> Shown<'a> {
    fn new(
        sequence: u64,
        subject: &'a str,
        headers: &HeaderMap,
        payload: &[u8],
        slot: &str,
    ) -> Self {
        let own = history::own_message(headers, sequence, slot);
        let body = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        Self {
            sequence,
            subject,
            position: own.and_then(|own| own.position),
            body,
        }
    }

    /// `#12 fraiseql.mutation.Order.INSERT 0/16B3748:0 INSERT public.tb_order {"pk_order":1}`.
    fn compact(&self) -> String {
        let Some(position) = self.position else {
            return format!(
                "#{} {} (not walstream's) {}",
                self.sequence, self.subject, self.body
            );
        };
        let text = |key: &str| self.body[key].as_str().unwrap_or("-").to_owned();
        let row = match &self.body["data"] {
            Value::Null => String::new(),
            data => format!(" {data}"),
        };
        format!(
            "#{} {} {}:{} {} {}{row}",
            self.sequence,
            self.subject,
            position.commit_lsn,
            position.seq,
            text("event"),
            text("table"),
        )
    }

    fn json(&self) -> Value {
        let mut shown = json!({
            "sequence": self.sequence,
            "subject": self.subject,
            "walstream": self.position.is_some(),
        });
        if let Some(position) = self.position {
            shown["lsn"] = json!(position.commit_lsn.to_string());
            shown["seq"] = json!(position.seq);
            shown["op"] = self.body["event"].clone();
            shown["table"] = self.body["table"].clone();
            shown["data"] = self.body["data"].clone();
        }
        shown["message"] = self.body.clone();
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(crate::nats::wire::MESSAGE_ID, "walstream:771:0/16B3748:0");
        headers.insert("Walstream-Xid", "771");
        headers.insert("Walstream-Lsn", "0/16B3748");
        headers.insert("Walstream-Seq", "0");
        headers
    }

    const EVENT: &[u8] = br#"{"event":"INSERT","table":"public.tb_order","data":{"pk_order":1}}"#;

    #[test]
    fn an_event_shows_its_place_operation_table_and_row() {
        let shown = Shown::new(
            12,
            "fraiseql.mutation.Order.INSERT",
            &event_headers(),
            EVENT,
            "walstream",
        );
        assert_eq!(
            shown.compact(),
            r#"#12 fraiseql.mutation.Order.INSERT 0/16B3748:0 INSERT public.tb_order {"pk_order":1}"#
        );
        let line = shown.json();
        assert_eq!(line["walstream"], true);
        assert_eq!(line["lsn"], "0/16B3748");
        assert_eq!(line["op"], "INSERT");
        assert_eq!(line["data"]["pk_order"], 1);
    }

    #[test]
    fn another_clients_message_is_shown_as_such() {
        let mut headers = event_headers();
        headers.insert(crate::nats::wire::MESSAGE_ID, "outbox:9");
        let shown = Shown::new(
            13,
            "events.order.shipped",
            &headers,
            b"not json",
            "walstream",
        );
        assert_eq!(
            shown.compact(),
            r#"#13 events.order.shipped (not walstream's) "not json""#
        );
        assert_eq!(shown.json()["walstream"], false);
        assert!(shown.json().get("lsn").is_none());
    }
}
