//! Prometheus metrics and the live status `/health` reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The values of `pg_replication_slots.wal_status`, one series each.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Every metric walstream exports, plus connection state for `/health`.
pub struct Metrics {
    registry: Registry,
    pub events_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub publish_retries: IntCounter,
    /// Transactions stored in more than one atomic batch (`nats.transactions = "atomic"`).
    pub split_transactions: IntCounter,
    /// Fast-ingest batches opened (nats-server 2.14+): events published over this is the mean
    /// batch size.
    pub fast_batches: IntCounter,
    /// Messages in the stream that another client published, as walstream came across them.
    pub other_publishers_messages: IntCounter,
    /// walstream's events in the stream that a promoted standby does not have (a failover).
    pub phantom_events: IntCounter,
    /// The timeline of the PostgreSQL server walstream streams from.
    pub postgres_timeline: IntGauge,
    pub inflight_acks: IntGauge,
    pub checkpoint_lsn: IntGauge,
    pub replication_lag_bytes: IntGauge,
    pub commit_to_ack_seconds: Histogram,
    pub reconnects: IntCounterVec,
    connected: IntGaugeVec,
    pub slot_wal_retained_bytes: IntGauge,
    pub slot_wal_status: IntGaugeVec,
    /// 1 while this instance waits for the lease another instance holds (`[ha]`).
    pub standby: IntGauge,
    pub replication_connected: AtomicBool,
    pub nats_connected: AtomicBool,
    /// The server's WAL end as last reported, to compute lag.
    pub server_wal_end: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let events_published = defined(IntCounterVec::new(
            Opts::new(
                "walstream_events_published_total",
                "Events acknowledged by JetStream, by table and operation",
            ),
            &["table", "op"],
        ));
        let publish_errors = defined(IntCounterVec::new(
            Opts::new(
                "walstream_publish_errors_total",
                "Failed JetStream publishes, by kind (each is re-sent)",
            ),
            &["kind"],
        ));
        let reconnects = defined(IntCounterVec::new(
            Opts::new(
                "walstream_reconnects_total",
                "Reconnections, by peer (postgres, nats)",
            ),
            &["peer"],
        ));
        let publish_retries = defined(IntCounter::new(
            "walstream_publish_retries_total",
            "Events re-sent after a failed or unconfirmed publish",
        ));
        let split_transactions = defined(IntCounter::new(
            "walstream_split_transactions_total",
            "Transactions larger than an atomic batch, stored in several (nats.transactions = \
             \"atomic\"); their events carry Walstream-Tx-Split",
        ));
        let fast_batches = defined(IntCounter::new(
            "walstream_fast_batches_total",
            "Fast-ingest batches published in (nats-server 2.14+); events published over this \
             is the mean batch size",
        ));
        let other_publishers_messages = defined(IntCounter::new(
            "walstream_other_publishers_messages_total",
            "Messages another client published into walstream's stream, counted where \
             walstream's own events continued after them",
        ));
        let phantom_events = defined(IntCounter::new(
            "walstream_phantom_events_total",
            "Events walstream had published from a primary that a promoted standby never \
             received: marked as void by a failover marker on <prefix>._failover",
        ));
        let postgres_timeline = defined(IntGauge::new(
            "walstream_postgres_timeline",
            "The timeline of the PostgreSQL primary walstream streams from (it grows with each \
             promotion)",
        ));
        let inflight_acks = defined(IntGauge::new(
            "walstream_inflight_acks",
            "Events handed to JetStream and not yet acknowledged",
        ));
        let checkpoint_lsn = defined(IntGauge::new(
            "walstream_checkpoint_lsn",
            "LSN up to which every event is in JetStream and the checkpoint is on disk",
        ));
        let replication_lag_bytes = defined(IntGauge::new(
            "walstream_replication_lag_bytes",
            "Server WAL end minus the checkpoint LSN",
        ));
        let commit_to_ack_seconds = defined(Histogram::with_opts(
            HistogramOpts::new(
                "walstream_commit_to_ack_seconds",
                "Time from a transaction's commit in PostgreSQL to JetStream's ack of its event",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
        ));
        let connected = defined(IntGaugeVec::new(
            Opts::new(
                "walstream_connected",
                "1 while walstream is connected to the peer (postgres, nats), else 0",
            ),
            &["peer"],
        ));
        let slot_wal_retained_bytes = defined(IntGauge::new(
            "walstream_slot_wal_retained_bytes",
            "WAL PostgreSQL keeps for the slot: current WAL LSN minus the slot's restart_lsn",
        ));
        let slot_wal_status = defined(IntGaugeVec::new(
            Opts::new(
                "walstream_slot_wal_status",
                "1 for the slot's current pg_replication_slots.wal_status, 0 for the others",
            ),
            &["status"],
        ));
        let standby = defined(IntGauge::new(
            "walstream_standby",
            "1 while this instance stands by for another that holds the slot's lease, else 0",
        ));
        let collectors: [Box<dyn prometheus::core::Collector>; 17] = [
            Box::new(split_transactions.clone()),
            Box::new(fast_batches.clone()),
            Box::new(other_publishers_messages.clone()),
            Box::new(phantom_events.clone()),
            Box::new(postgres_timeline.clone()),
            Box::new(standby.clone()),
            Box::new(events_published.clone()),
            Box::new(publish_errors.clone()),
            Box::new(publish_retries.clone()),
            Box::new(inflight_acks.clone()),
            Box::new(checkpoint_lsn.clone()),
            Box::new(replication_lag_bytes.clone()),
            Box::new(commit_to_ack_seconds.clone()),
            Box::new(reconnects.clone()),
            Box::new(connected.clone()),
            Box::new(slot_wal_retained_bytes.clone()),
            Box::new(slot_wal_status.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        }
        Self {
            registry,
            events_published,
            publish_errors,
            publish_retries,
            split_transactions,
            fast_batches,
            other_publishers_messages,
            phantom_events,
            postgres_timeline,
            inflight_acks,
            checkpoint_lsn,
            replication_lag_bytes,
            commit_to_ack_seconds,
            reconnects,
            connected,
            slot_wal_retained_bytes,
            slot_wal_status,
            standby,
            replication_connected: AtomicBool::new(false),
            nats_connected: AtomicBool::new(false),
            server_wal_end: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        for (peer, flag) in [
            ("postgres", &self.replication_connected),
            ("nats", &self.nats_connected),
        ] {
            self.connected
                .with_label_values(&[peer])
                .set(i64::from(flag.load(Ordering::Relaxed)));
        }
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn set_checkpoint(&self, lsn: u64) {
        self.checkpoint_lsn.set(lsn as i64);
        self.update_lag();
    }

    pub fn set_server_wal_end(&self, lsn: u64) {
        self.server_wal_end.fetch_max(lsn, Ordering::Relaxed);
        self.update_lag();
    }

    fn update_lag(&self) {
        let end = self.server_wal_end.load(Ordering::Relaxed) as i64;
        let checkpoint = self.checkpoint_lsn.get();
        self.replication_lag_bytes.set((end - checkpoint).max(0));
    }

    /// The slot's state as `pg_replication_slots` reports it.
    pub fn set_slot(&self, retained_bytes: Option<i64>, wal_status: Option<&str>) {
        self.slot_wal_retained_bytes
            .set(retained_bytes.unwrap_or(0));
        for status in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[status])
                .set(i64::from(wal_status == Some(status)));
        }
    }

    pub fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }
}

/// Unwraps a metric built from constant names and options, which cannot fail.
fn defined<T>(metric: prometheus::Result<T>) -> T {
    metric.unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `walstream_*` name the shipped alerts and dashboard query.
    fn referenced_metrics() -> Vec<String> {
        let files = [
            include_str!("../deploy/prometheus/alerts.yml"),
            include_str!("../deploy/grafana/walstream.json"),
        ];
        let mut names = Vec::new();
        for text in files {
            let mut rest = text;
            while let Some(at) = rest.find("walstream_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name)
                    .to_owned();
                names.push(base);
            }
        }
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn alerts_and_dashboard_query_only_metrics_walstream_exports() {
        let metrics = Metrics::new();
        metrics.events_published.with_label_values(&["t", "INSERT"]);
        metrics.publish_errors.with_label_values(&["timeout"]);
        metrics.reconnects.with_label_values(&["nats"]);
        metrics.set_slot(Some(1), Some("reserved"));
        let exported = metrics.render();
        let referenced = referenced_metrics();
        assert!(referenced.len() >= 8, "{referenced:?}");
        for name in referenced {
            assert!(
                exported.contains(&format!("\n{name}"))
                    || exported.contains(&format!("# HELP {name} ")),
                "{name} is queried by deploy/ but not exported"
            );
        }
    }
}
