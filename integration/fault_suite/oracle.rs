//! The fault suite's oracle: what PostgreSQL committed, decoded from a second slot by its own
//! `test_decoding` plugin, checked against every message of the stream.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::Value;

use super::harness::Stored;
use super::other_publisher::{Published, MARK};
use super::workload::TABLE_ROWS;

pub const SLOT: &str = "oracle";

/// One committed transaction as `test_decoding` tells it.
#[derive(Debug)]
pub struct Committed {
    pub xid: u32,
    /// The end of its commit record: walstream's commit LSN lies before it and after the
    /// previous transaction's.
    pub end_lsn: u64,
    /// (table, operation) of each change, in order.
    pub changes: Vec<(String, String)>,
}

/// Every transaction with at least one change, in commit order, from the oracle slot.
pub async fn committed(client: &tokio_postgres::Client) -> anyhow::Result<Vec<Committed>> {
    let rows = client
        .query(
            "SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_changes($1, NULL, NULL, \
             'include-xids', '1', 'skip-empty-xacts', '1')",
            &[&SLOT],
        )
        .await?;
    let mut transactions = Vec::new();
    let mut open: Option<Committed> = None;
    for row in rows {
        let (lsn, xid, data): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        if data.starts_with("BEGIN") {
            open = Some(Committed {
                xid: xid as u32,
                end_lsn: 0,
                changes: Vec::new(),
            });
        } else if data.starts_with("COMMIT") {
            let mut transaction = open
                .take()
                .ok_or_else(|| anyhow::anyhow!("COMMIT without BEGIN at {lsn}"))?;
            transaction.end_lsn = parse_lsn(&lsn)?;
            if !transaction.changes.is_empty() {
                transactions.push(transaction);
            }
        } else if let Some(rest) = data.strip_prefix("table ") {
            // `table public.t_a: INSERT: id[bigint]:1 …`
            let mut parts = rest.splitn(3, ": ");
            let (table, op) = (parts.next(), parts.next());
            let (Some(table), Some(op), Some(transaction)) = (table, op, open.as_mut()) else {
                anyhow::bail!("unexpected test_decoding line at {lsn}: {data:.80}");
            };
            transaction.changes.push((table.to_owned(), op.to_owned()));
        }
    }
    Ok(transactions)
}

fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    walstream::lsn::parse_lsn(text)
        .map(|lsn| lsn.0)
        .map_err(|e| anyhow::anyhow!("LSN {text}: {e}"))
}

/// What the oracle found; every count but `changes_checked` must be zero.
#[derive(Debug, Default)]
pub struct Verdict {
    pub transactions: usize,
    pub changes_checked: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub out_of_order: usize,
    pub wrong_content: usize,
    pub table_mismatches: usize,
    /// The other publisher's messages found in the stream.
    pub others_found: usize,
    /// Its messages JetStream acknowledged and the stream does not hold.
    pub others_lost: usize,
    /// Its messages in the stream more than once, or that it never published.
    pub others_wrong: usize,
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost
            + self.duplicated
            + self.unexpected
            + self.out_of_order
            + self.wrong_content
            + self.table_mismatches
            + self.others_lost
            + self.others_wrong
            == 0
    }

    fn problem(&mut self, example: String) {
        if self.examples.len() < 10 {
            self.examples.push(example);
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} transactions, {} changes checked: {} lost, {} duplicated, {} unexpected, \
             {} out of order, {} with the wrong table or operation, {} table rows differing; \
             another publisher's messages: {} in the stream, {} acknowledged but lost, {} \
             duplicated or unknown",
            self.transactions,
            self.changes_checked,
            self.lost,
            self.duplicated,
            self.unexpected,
            self.out_of_order,
            self.wrong_content,
            self.table_mismatches,
            self.others_found,
            self.others_lost,
            self.others_wrong
        )?;
        for example in &self.examples {
            write!(f, "\n  {example}")?;
        }
        Ok(())
    }
}

/// An event's place in the stream: (xid, commit LSN, seq) from its message id.
fn identity(message: &Stored) -> Option<(u32, u64, u64)> {
    let mut parts = message.message_id.split(':');
    let (_slot, xid, lsn, seq) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let lsn = walstream::lsn::parse_lsn(lsn).ok()?.0;
    Some((xid.parse().ok()?, lsn, seq.parse().ok()?))
}

/// Checks the stream against what was committed and what the other publisher published:
/// (1) every change exactly once, by message id, (2) in commit order, (3) folded in order into
/// tables, equal to `tables`; (4) the other publisher's messages, told apart by its mark,
/// there if JetStream acknowledged them, and at most once unless published without an id.
pub fn judge(
    committed: &[Committed],
    messages: &[Stored],
    tables: &HashMap<&'static str, BTreeMap<String, Value>>,
    others: &Published,
) -> Verdict {
    let mut verdict = Verdict {
        transactions: committed.len(),
        ..Verdict::default()
    };
    let (other_messages, messages): (Vec<Stored>, Vec<Stored>) = messages
        .iter()
        .cloned()
        .partition(|m| m.headers.get(MARK).is_some());
    check_others(&mut verdict, &other_messages, others);
    let messages = &messages[..];
    let mut by_xid: HashMap<u32, Vec<(u64, u64, &Stored)>> = HashMap::new();
    let mut stream_order = Vec::new();
    for message in messages {
        match identity(message) {
            Some((xid, lsn, seq)) => {
                by_xid.entry(xid).or_default().push((lsn, seq, message));
                stream_order.push((lsn, seq, message.sequence));
            }
            None => {
                verdict.unexpected += 1;
                verdict.problem(format!(
                    "sequence {}: message id {:?} is not slot:xid:lsn:seq",
                    message.sequence, message.message_id
                ));
            }
        }
    }
    let mut previous_end = 0;
    for transaction in committed {
        let events = by_xid.remove(&transaction.xid).unwrap_or_default();
        check_transaction(&mut verdict, transaction, previous_end, &events);
        previous_end = transaction.end_lsn;
    }
    for (xid, events) in by_xid {
        verdict.unexpected += events.len();
        verdict.problem(format!(
            "xid {xid}: {} events of a transaction PostgreSQL did not commit with changes",
            events.len()
        ));
    }
    for pair in stream_order.windows(2) {
        if (pair[1].0, pair[1].1) <= (pair[0].0, pair[0].1) {
            verdict.out_of_order += 1;
            verdict.problem(format!(
                "sequence {}: position {:?} after {:?}",
                pair[1].2,
                (pair[1].0, pair[1].1),
                (pair[0].0, pair[0].1)
            ));
        }
    }
    compare_tables(&mut verdict, &fold(messages), tables);
    verdict
}

fn check_others(verdict: &mut Verdict, messages: &[Stored], published: &Published) {
    let mut seen = std::collections::BTreeSet::new();
    for message in messages {
        verdict.others_found += 1;
        let number = message
            .headers
            .get(MARK)
            .and_then(|n| n.as_str().parse::<u64>().ok());
        let known = number.is_some_and(|n| published.attempted.contains(&n));
        let repeatable = number.is_some_and(|n| published.without_id.contains(&n));
        if !known || (!seen.insert(number) && !repeatable) {
            verdict.others_wrong += 1;
            verdict.problem(format!(
                "sequence {}: the other publisher's message {number:?} {}",
                message.sequence,
                if known {
                    "twice"
                } else {
                    "was never published"
                }
            ));
        }
    }
    for number in &published.stored {
        if !seen.contains(&Some(*number)) {
            verdict.others_lost += 1;
            verdict.problem(format!(
                "the other publisher's message {number}: acknowledged, not in the stream"
            ));
        }
    }
}

/// One transaction: its events carry seq 0..n once each, with the table and operation
/// PostgreSQL decoded at that position, one commit LSN inside the transaction's commit
/// record, and `Walstream-Tx-Last` on the last one only.
fn check_transaction(
    verdict: &mut Verdict,
    transaction: &Committed,
    previous_end: u64,
    events: &[(u64, u64, &Stored)],
) {
    let xid = transaction.xid;
    let mut seen = vec![0usize; transaction.changes.len()];
    for &(lsn, seq, message) in events {
        if lsn <= previous_end || lsn >= transaction.end_lsn {
            verdict.wrong_content += 1;
            verdict.problem(format!(
                "xid {xid}: commit LSN {lsn:X} outside ({previous_end:X}, {:X})",
                transaction.end_lsn
            ));
        }
        let Some(count) = seen.get_mut(seq as usize) else {
            verdict.unexpected += 1;
            verdict.problem(format!(
                "xid {xid}: seq {seq} but it committed {} changes",
                transaction.changes.len()
            ));
            continue;
        };
        *count += 1;
        // Every table is watched here, so the last change committed is the last event.
        let last = seq as usize + 1 == transaction.changes.len();
        let marked = message
            .headers
            .get(walstream::pipeline::event::HEADER_TX_LAST)
            .is_some_and(|v| v.as_str() == "true");
        if marked != last {
            verdict.wrong_content += 1;
            verdict.problem(format!(
                "xid {xid} seq {seq} of {}: {HEADER} {}",
                transaction.changes.len(),
                if marked {
                    "on an event before the last"
                } else {
                    "missing on the last event"
                },
                HEADER = walstream::pipeline::event::HEADER_TX_LAST,
            ));
        }
        let (table, op) = &transaction.changes[seq as usize];
        if message.body["table"] != table.as_str() || message.body["event"] != op.as_str() {
            verdict.wrong_content += 1;
            verdict.problem(format!(
                "xid {xid} seq {seq}: {} {} in the stream, {table} {op} committed",
                message.body["table"], message.body["event"]
            ));
        }
    }
    for (seq, count) in seen.iter().enumerate() {
        verdict.changes_checked += 1;
        match count {
            0 => {
                verdict.lost += 1;
                verdict.problem(format!("xid {xid} seq {seq}: committed, not in the stream"));
            }
            1 => {}
            n => {
                verdict.duplicated += n - 1;
                verdict.problem(format!("xid {xid} seq {seq}: {n} times in the stream"));
            }
        }
    }
}

/// The tables as the stream tells them: every event applied in stream order.
pub fn fold(messages: &[Stored]) -> HashMap<&'static str, BTreeMap<String, Value>> {
    let mut tables: HashMap<&'static str, BTreeMap<String, Value>> = TABLE_ROWS
        .iter()
        .map(|(table, _)| (*table, BTreeMap::new()))
        .collect();
    for message in messages {
        let body = &message.body;
        let Some(rows) = body["table"].as_str().and_then(|t| tables.get_mut(t)) else {
            continue;
        };
        match body["event"].as_str() {
            Some("TRUNCATE") => rows.clear(),
            Some("DELETE") => {
                rows.remove(&key(&body["data"]));
            }
            Some("INSERT") => {
                rows.insert(key(&body["data"]), body["data"].clone());
            }
            Some("UPDATE") => {
                let mut row = body["data"].clone();
                let previous = if body["old"].is_object() {
                    rows.remove(&key(&body["old"]))
                } else {
                    rows.get(&key(&row)).cloned()
                };
                // An unchanged TOAST column is left out of `data`: it keeps its value.
                for column in body["unchanged_toast"].as_array().into_iter().flatten() {
                    let column = column.as_str().unwrap_or_default();
                    let kept = previous.as_ref().map_or(Value::Null, |p| p[column].clone());
                    row[column] = kept;
                }
                rows.insert(key(&row), row);
            }
            _ => {}
        }
    }
    tables
}

/// A row's primary key as text (`id` or `k`).
fn key(row: &Value) -> String {
    match (&row["id"], &row["k"]) {
        (Value::Null, Value::String(k)) => k.clone(),
        (id, _) => id.to_string(),
    }
}

fn compare_tables(
    verdict: &mut Verdict,
    streamed: &HashMap<&'static str, BTreeMap<String, Value>>,
    tables: &HashMap<&'static str, BTreeMap<String, Value>>,
) {
    for (table, rows) in tables {
        let empty = BTreeMap::new();
        let folded = streamed.get(table).unwrap_or(&empty);
        for (key, row) in rows {
            if folded.get(key) != Some(row) {
                verdict.table_mismatches += 1;
                verdict.problem(format!(
                    "{table} {key}: table {}, stream {}",
                    short(row),
                    folded.get(key).map_or("missing".to_owned(), short)
                ));
            }
        }
        for key in folded.keys().filter(|key| !rows.contains_key(*key)) {
            verdict.table_mismatches += 1;
            verdict.problem(format!("{table} {key}: in the stream, not in the table"));
        }
    }
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(160) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}
