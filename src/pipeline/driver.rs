//! Runs the pipeline: reads the slot, decodes each change, publishes it in WAL order, and moves
//! the checkpoint (RocksDB, then the slot) only over what JetStream has acknowledged.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::FutureExt;
use prometheus::IntCounter;
use tokio::sync::{broadcast, watch};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::nats;
use crate::op::Op;
use crate::pipeline::backfill::{self, Watches};
use crate::pipeline::checkpoint::{Checkpoint, CheckpointError};
use crate::pipeline::delivery::{Delivery, ResumePlan};
use crate::pipeline::event::failover::FailoverMarker;
use crate::pipeline::event::replay::PositionText;
use crate::pipeline::event::{
    ColumnCountMismatch, EncodedEvent, Encoder, Naming, RelationInfo, Transaction,
};
use crate::pipeline::history;
use crate::pipeline::pgoutput::{self, Message, TupleData};
use crate::pipeline::progress::Progress;
use crate::pipeline::sink::{PublishMode, Sink, StoredEvent, StreamFacts};
use crate::pipeline::source::{ReplicationStream, ReplicationTarget, SessionError, WalMessage};
use crate::pipeline::timeline::History;
use crate::postgres::{self, HEARTBEAT_PREFIX};

/// How often acknowledged progress is written to RocksDB and reported to PostgreSQL.
const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// At most this many replication messages already waiting are handled in a row, so acks,
/// the progress tick and a shutdown are looked at in between.
const READY_AT_ONCE: usize = 64;
/// How long a graceful stop waits for outstanding acks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the stream's end, waiting out a JetStream cluster electing the stream's leader.
async fn read_tail_patiently(
    js: &jetstream::Context,
    stream_name: &str,
    slot: &str,
    give_up_after: Duration,
) -> anyhow::Result<history::StreamTail> {
    let mut backoff = Backoff::new();
    loop {
        match history::read_tail(js, stream_name, slot, history::RESUME_SEARCH_LIMIT).await {
            Ok(tail) => return Ok(tail),
            Err(error) if backoff.elapsed() < give_up_after => {
                tracing::warn!(
                    stream = stream_name,
                    "the stream's end is not readable yet ({error}); retrying in {:?}",
                    backoff.peek()
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Says what the search for walstream's last message passed over.
fn report_other_publishers(tail: &history::StreamTail, stream_name: &str, metrics: &Metrics) {
    if tail.others_after > 0 && tail.own.is_some() {
        metrics.other_publishers_messages.inc_by(tail.others_after);
        tracing::info!(
            stream = stream_name,
            messages = tail.others_after,
            "messages another client published after walstream's last event; walstream's \
             events go on after them"
        );
    }
    if tail.search_cut_short {
        tracing::warn!(
            stream = stream_name,
            searched = history::RESUME_SEARCH_LIMIT,
            "none of the stream's last messages is walstream's: another client published them. \
             walstream resumes from its checkpoint and the slot, and may publish again events \
             stored before them (a duplicate, never a loss)"
        );
    }
}

/// Why walstream stops when its slot is gone, and what the operator can do.
fn slot_gone_message(slot: &str) -> String {
    format!(
        "replication slot {slot} no longer exists. walstream does not recreate it on its own: \
         the changes committed since it was dropped are not in the WAL any more for it. \
         Recreate it with `walstream setup` to stream from now on, then re-emit the tables' \
         current rows with `walstream backfill --table …`: the changes made in between are not \
         in the WAL for walstream, only their result is in the tables"
    )
}

/// Runs the pipeline until `shutdown` turns true or a fatal error.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    subscribers: Option<broadcast::Sender<Arc<StoredEvent>>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&config.checkpoint.path)?;
    let control = postgres::connect(&config.database.url).await?;
    let naming = Naming::from_config(&config);
    let nats = nats::connect(&config.nats, metrics.clone(), Duration::from_secs(60)).await?;
    match nats::server_features(&nats).await {
        Ok(features) => tracing::info!("NATS: {features}"),
        Err(error) => {
            tracing::warn!("NATS: cannot read the JetStream account information: {error}")
        }
    }
    let server_version = nats.server_info().version;
    // The sink publishes on a connection of its own (nats::publisher); this client carries the
    // acknowledgements' subscriptions, and the context JetStream's requests.
    let js = jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout())
        .build(nats);
    let stream_name = config.nats.stream_name.clone();
    let batches = PublishMode::stream_needs(
        config.nats.jetstream.replicas,
        &server_version,
        &config.nats,
    );
    let stream = nats::ensure_stream(
        &js,
        &stream_name,
        naming.stream_subjects(),
        &config.nats.jetstream,
        batches,
    )
    .await?;
    let facts = StreamFacts {
        replicas: stream.config.num_replicas,
        server_version: &server_version,
        atomic_allowed: stream.config.allow_atomic_publish,
        batched_allowed: stream.config.allow_batch_publish,
    };
    let mode = PublishMode::for_stream(facts, &config.nats)?;
    let slot = &config.replication.slot;
    let tail = read_tail_patiently(&js, &stream_name, slot, Duration::from_secs(60))
        .await
        .with_context(|| format!("cannot read the end of stream {stream_name}"))?;
    tracing::info!(
        stream = %stream_name,
        last_sequence = tail.sequence,
        last_position = ?tail.position(),
        replicas = stream.config.num_replicas,
        publishing = mode.name(),
        "stream ready"
    );
    report_other_publishers(&tail, &stream_name, &metrics);
    // A missing slot is created only for a walstream with no history. With history (a
    // checkpoint, or walstream's events in the stream) it was dropped or lost, and creating a
    // new one would silently skip every change made since.
    let checkpointed = checkpoint.confirmed_lsn()?;
    let has_history = checkpointed.is_some() || tail.position().is_some();
    if has_history
        && postgres::slot_info(&control, &config.replication.slot)
            .await?
            .is_none()
    {
        anyhow::bail!(slot_gone_message(&config.replication.slot));
    }
    postgres::ensure_publication_and_slot(
        &control,
        &config,
        config.replication.create_publication,
        config.replication.create_slot,
    )
    .await?;
    let target = ReplicationTarget::from_config(&config)?;
    let heartbeat = spawn_heartbeat(&config, shutdown.clone());
    let slot_watch = tokio::spawn(crate::pipeline::slot_watch::run(
        config.database.url.clone(),
        config.replication.slot.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let plan = ResumePlan::from_tail(tail.position(), tail.replay());
    if let Some(replay) = plan.replay {
        tracing::info!(
            replay = replay.id,
            from = ?plan.from,
            through = %PositionText(replay.through),
            "replaying: events up to the replay's end are delivered again, marked as replays"
        );
    }
    // A replay decodes again from where it stands, whatever the checkpoint says.
    let durable = plan.from.or(checkpointed).unwrap_or(Lsn(0));
    metrics.set_checkpoint(durable.0);
    // A backfill under way needs the changes since it started decoded again after a restart.
    let rewind_to = checkpoint.backfill_hold()?;
    let checkpoint_timeline = checkpoint.timeline()?;
    let sink = Sink::new(
        js.clone(),
        nats::Publisher::connect(&config.nats, Duration::from_secs(60)).await?,
        stream_name.clone(),
        config.nats.max_inflight,
        mode,
        config.ack_timeout(),
        &tail,
        metrics.clone(),
        shutdown.clone(),
    )
    .await?
    .with_subscribers(subscribers);
    let mut pipeline = Pipeline {
        outlet: Outlet {
            delivery: Delivery::new(&plan),
            encoder: Encoder::new(naming),
            sink,
            progress: Progress::new(
                durable,
                rewind_to,
                config.replication.replay_retention,
                PERSIST_INTERVAL,
            ),
            held: None,
        },
        backfills: Watches::default(),
        timelines: Timelines {
            session: None,
            // Events from before walstream wrote their timeline were read on the checkpoint's.
            events: tail.timeline().or(checkpoint_timeline),
            checkpoint: checkpoint_timeline,
        },
        js,
        stream_name,
        checkpoint: Arc::new(checkpoint),
        metrics,
        shutdown,
        control,
        database_url: config.database.url.clone(),
        slot: config.replication.slot.clone(),
        receive_timeout: Duration::from_secs(config.replication.receive_timeout_secs),
        status_interval: Duration::from_secs(config.replication.status_interval_secs),
        relations: HashMap::new(),
        type_names: HashMap::new(),
        tx: None,
        checkpoint_write: None,
    };
    let result = pipeline.run_sessions(&target).await;
    if let Some(heartbeat) = heartbeat {
        heartbeat.abort();
    }
    slot_watch.abort();
    result
}

/// Why a replication session ended.
enum SessionEnd {
    Shutdown,
    /// The connection was lost; reconnect and resume.
    Lost(String),
}

struct RelationEntry {
    info: RelationInfo,
    published: [IntCounter; 5],
}

/// The PostgreSQL timelines walstream's positions were read on: what a new session's history
/// is checked against.
struct Timelines {
    /// The session's, once its server is found; every event it publishes carries it.
    session: Option<u32>,
    /// That of walstream's last event in the stream.
    events: Option<u32>,
    /// That of the checkpoint's LSN.
    checkpoint: Option<u32>,
}

struct Pipeline {
    outlet: Outlet,
    timelines: Timelines,
    /// For reading the stream back after a failover (the sink publishes on its own client).
    js: jetstream::Context,
    stream_name: String,
    checkpoint: Arc<Checkpoint>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    control: tokio_postgres::Client,
    database_url: String,
    slot: String,
    receive_timeout: Duration,
    status_interval: Duration,
    relations: HashMap<u32, RelationEntry>,
    type_names: HashMap<u32, String>,
    /// The transaction being decoded.
    tx: Option<Transaction>,
    /// Backfills under way: which of their tables' rows live changes touched.
    backfills: Watches,
    /// The checkpoint write under way (`Progress` knows its LSN). RocksDB syncs to disk, which
    /// can take a long while on a busy disk; done on the runtime's thread it would stall
    /// decoding and publishing.
    checkpoint_write: Option<tokio::task::JoinHandle<Result<(), CheckpointError>>>,
}

/// Where every event goes, row changes, backfill rows and logical messages alike: admitted
/// (not already in the stream; marked when a replay covers it), encoded, published, counted.
struct Outlet {
    delivery: Delivery,
    encoder: Encoder,
    sink: Sink,
    progress: Progress,
    /// The open transaction's newest event, held until the next event or the commit says
    /// whether it is the transaction's last (`Walstream-Tx-Last`).
    held: Option<(EncodedEvent, IntCounter)>,
}

impl Outlet {
    /// Publishes the transaction's next change as `encode` makes it, unless the stream has it.
    async fn publish(
        &mut self,
        tx: &mut Transaction,
        published: &IntCounter,
        encode: impl FnOnce(&mut Encoder, &mut Transaction) -> Result<EncodedEvent, ColumnCountMismatch>,
    ) -> anyhow::Result<()> {
        let Some(event) = self.admitted(tx, encode)? else {
            return Ok(());
        };
        match self.held.replace((event, published.clone())) {
            Some((previous, counter)) => self.send(previous, counter).await,
            None => Ok(()),
        }
    }

    /// Publishes an event that is a transaction of its own, unless the stream has it.
    async fn publish_alone(
        &mut self,
        tx: &mut Transaction,
        published: &IntCounter,
        encode: impl FnOnce(&mut Encoder, &mut Transaction) -> Result<EncodedEvent, ColumnCountMismatch>,
    ) -> anyhow::Result<()> {
        let Some(mut event) = self.admitted(tx, encode)? else {
            return Ok(());
        };
        event.last_in_transaction = true;
        self.send(event, published.clone()).await
    }

    /// The event `encode` makes, unless the stream already has it.
    fn admitted(
        &mut self,
        tx: &mut Transaction,
        encode: impl FnOnce(&mut Encoder, &mut Transaction) -> Result<EncodedEvent, ColumnCountMismatch>,
    ) -> anyhow::Result<Option<EncodedEvent>> {
        if !self.delivery.admit(tx) {
            return Ok(None);
        }
        Ok(Some(encode(&mut self.encoder, tx)?))
    }

    /// The open transaction committed: the event held is its last.
    async fn end_transaction(&mut self) -> anyhow::Result<()> {
        match self.held.take() {
            Some((mut event, counter)) => {
                event.last_in_transaction = true;
                self.send(event, counter).await
            }
            None => Ok(()),
        }
    }

    /// The open transaction is read again from its start (a new session): its held event
    /// goes with it, never published without knowing whether it is the last, and so do its
    /// events the sink has not sent (atomic transactions send a transaction only whole).
    fn abandon_transaction(&mut self) {
        self.held = None;
        let withdrawn = self.sink.withdraw_unsent();
        self.progress.withdrawn(withdrawn);
    }

    async fn send(&mut self, event: EncodedEvent, published: IntCounter) -> anyhow::Result<()> {
        self.progress.published();
        Ok(self.sink.publish(event, published).await?)
    }

    /// Brings the progress up to what JetStream has acknowledged.
    fn count_acks(&mut self) {
        self.progress.acknowledged(self.sink.acknowledged());
    }
}

impl Pipeline {
    async fn run_sessions(&mut self, target: &ReplicationTarget) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        loop {
            if self.is_shutting_down() {
                return self.drain_and_stop(None).await;
            }
            match self.open_session(target).await? {
                Ok(mut client) => {
                    self.metrics
                        .replication_connected
                        .store(true, Ordering::Relaxed);
                    self.metrics.set_last_error(None);
                    backoff = Backoff::new();
                    let end = self.stream(&mut client).await;
                    self.metrics
                        .replication_connected
                        .store(false, Ordering::Relaxed);
                    match end {
                        Ok(SessionEnd::Shutdown) => return self.drain_and_stop(Some(client)).await,
                        Ok(SessionEnd::Lost(reason)) => {
                            drop(client);
                            self.lost(format!("replication connection lost: {reason}"));
                        }
                        Err(error) => {
                            self.salvage(&client).await;
                            return Err(error);
                        }
                    }
                }
                Err(reason) => self.lost(reason),
            }
            // Everything in flight must be in the stream before the next session decides where
            // to resume, or it would be published again.
            self.finish_in_flight().await?;
            self.reset_session_state();
            let delay = backoff.next_delay();
            tracing::info!("reconnecting to PostgreSQL in {delay:?}");
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Finds the primary, follows its timeline, and starts streaming where walstream resumes.
    /// The inner error is why this session could not start (tried again); the outer is fatal.
    async fn open_session(
        &mut self,
        target: &ReplicationTarget,
    ) -> anyhow::Result<Result<ReplicationStream, String>> {
        let primary = match target.find_primary().await {
            Ok(primary) => primary,
            Err(error) => {
                return Ok(Err(format!(
                    "cannot reach a primary ({}): {error:#}",
                    target.display_all()
                )))
            }
        };
        self.follow_timeline(&primary.history).await?;
        let start = self.resume_point().await?;
        tracing::info!(
            server = target.display_primary(&primary),
            timeline = primary.history.current,
            slot = %self.slot,
            start = %start,
            skip_through = ?self.outlet.delivery.skip_through,
            "starting replication"
        );
        Ok(target
            .start(&primary, start, self.outlet.progress.confirmed())
            .await
            .map_err(|error| format!("{error:#}")))
    }

    /// Checks what walstream read before against the server's history. After a promotion the
    /// new primary shares the old one's WAL only up to the switch point: the checkpoint is
    /// taken back to it, and walstream's events committed past it (published before the
    /// standby had them) are marked void in the stream. A server whose history does not lead
    /// from walstream's timeline stops walstream.
    async fn follow_timeline(&mut self, history: &History) -> anyhow::Result<()> {
        let current = history.current;
        self.metrics.postgres_timeline.set(i64::from(current));
        if let Some(switch) = history.diverges_at(self.timelines.checkpoint)? {
            self.persist_now(None).await?;
            let before = self.outlet.progress.durable();
            self.outlet.progress.diverged(switch);
            let durable = self.outlet.progress.durable();
            self.checkpoint
                .store_progress(durable, self.backfills.hold(), Some(current))?;
            self.metrics.set_checkpoint(durable.0);
            tracing::warn!(
                from_timeline = ?self.timelines.checkpoint,
                timeline = current,
                switch = %switch,
                checkpoint = %before,
                resume_at_most = %durable,
                "PostgreSQL was promoted: its history parts from the one walstream read at the \
                 switch point; resuming from there at the latest"
            );
        }
        if let Some(switch) = history.diverges_at(self.timelines.events)? {
            let past_switch = self
                .outlet
                .sink
                .last_position()
                .is_some_and(|last| last.commit_lsn >= switch);
            if past_switch {
                let from_timeline = self.timelines.events.unwrap_or_default();
                self.void_phantoms(from_timeline, current, switch).await?;
            }
        }
        self.timelines = Timelines {
            session: Some(current),
            events: Some(current),
            checkpoint: Some(current),
        };
        Ok(())
    }

    /// Marks walstream's events committed at or after `switch` void with a failover marker,
    /// then resumes after everything committed before it.
    async fn void_phantoms(
        &mut self,
        from_timeline: u32,
        timeline: u32,
        switch: Lsn,
    ) -> anyhow::Result<()> {
        let phantoms = history::events_since(&self.js, &self.stream_name, &self.slot, switch)
            .await
            .context("reading back the events the promoted server does not have")?;
        let Some(phantoms) = phantoms else {
            return Ok(());
        };
        tracing::error!(
            stream = %self.stream_name,
            switch = %switch,
            from_timeline,
            timeline,
            events = phantoms.count,
            first_sequence = phantoms.first_sequence,
            last_sequence = phantoms.last_sequence,
            "walstream published events the promoted server never received (a failover \
             without synchronized_standby_slots, or an asynchronous standby): for the database \
             they never happened. A marker on {} names them; the new primary's changes follow it",
            self.outlet.encoder.naming().failover_subject()
        );
        self.metrics.phantom_events.inc_by(phantoms.count);
        let marker = self.outlet.encoder.failover_marker(&FailoverMarker {
            from_timeline,
            timeline,
            switch,
            phantoms,
        });
        let published = self
            .metrics
            .events_published
            .with_label_values(&["_failover", "FAILOVER"]);
        self.outlet.progress.published();
        self.outlet.sink.publish(marker, published).await?;
        self.outlet.sink.flush().await?;
        self.outlet.count_acks();
        self.outlet.delivery.skip_through = self.outlet.sink.last_position();
        Ok(())
    }

    fn lost(&self, reason: String) {
        tracing::warn!("{reason}");
        self.metrics
            .reconnects
            .with_label_values(&["postgres"])
            .inc();
        self.metrics.set_last_error(Some(reason));
    }

    /// The session's timeline, which every event it reads was read on.
    fn timeline(&self) -> u32 {
        self.timelines.session.unwrap_or_default()
    }

    fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn reset_session_state(&mut self) {
        self.relations.clear();
        self.type_names.clear();
        self.tx = None;
        self.outlet.abandon_transaction();
    }

    /// Where the next session starts: the later of our checkpoint and the slot's confirmed
    /// position. Events already in the stream past it are skipped by `skip_through`.
    async fn resume_point(&mut self) -> anyhow::Result<Lsn> {
        let slot = loop {
            match self.slot_info().await {
                Ok(slot) => break slot,
                Err(error) if !self.is_shutting_down() => {
                    self.lost(format!("cannot read the slot's state: {error:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error),
            }
        };
        let Some(slot) = slot else {
            anyhow::bail!(slot_gone_message(&self.slot));
        };
        if let Some(why) = slot.invalidated(&self.slot) {
            anyhow::bail!(why);
        }
        let slot_confirmed = slot.confirmed_flush_lsn.unwrap_or(Lsn(0));
        Ok(self.outlet.progress.resume_point(slot_confirmed))
    }

    async fn slot_info(&mut self) -> anyhow::Result<Option<postgres::SlotInfo>> {
        if self.control.is_closed() {
            self.control = postgres::connect(&self.database_url).await?;
        }
        postgres::slot_info(&self.control, &self.slot).await
    }

    /// Reads the replication stream until shutdown or a lost connection.
    async fn stream(&mut self, client: &mut ReplicationStream) -> anyhow::Result<SessionEnd> {
        let mut last_received = Instant::now();
        let mut tick = tokio::time::interval(PERSIST_INTERVAL);
        // PostgreSQL had nothing ready at the last look.
        let mut quiet = false;
        loop {
            let watchdog = tokio::time::sleep_until((last_received + self.receive_timeout).into());
            tokio::select! {
                biased;
                changed = self.shutdown.changed() => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                ack = self.outlet.sink.next_ack_result(), if self.outlet.sink.in_flight() > 0 => {
                    if let Some(ack) = ack {
                        self.outlet.sink.handle_ack(ack).await?;
                    }
                }
                received = client.recv() => {
                    quiet = false;
                    // The messages already waiting are handled here rather than one per turn
                    // of the select: each turn re-arms the watchdog's timer and every branch's
                    // future, 7% of walstream's CPU in a backlog drain's profile (2% since).
                    let mut next = Some(received);
                    let mut handled = 0;
                    while let Some(received) = next.take() {
                        if let Some(end) = self.receive(received).await? {
                            return Ok(end);
                        }
                        handled += 1;
                        if handled < READY_AT_ONCE {
                            next = client.recv().now_or_never();
                        }
                    }
                    // Counted from after handling: publishing may have waited on NATS, which
                    // is not PostgreSQL's silence.
                    last_received = Instant::now();
                }
                _ = watchdog => {
                    if let Some(reason) = self.dead_link().await {
                        return Ok(SessionEnd::Lost(reason));
                    }
                    last_received = Instant::now();
                }
                _ = tick.tick() => {}
                // Last: only when PostgreSQL has nothing ready, so a fast-ingest batch ends
                // with the burst that filled it, not before. Nothing ready may only mean the
                // stream's reader task has not read the socket yet: it gets one turn first.
                () = std::future::ready(()), if self.outlet.sink.burst_open() => {
                    if std::mem::replace(&mut quiet, true) {
                        self.outlet.sink.end_burst().await?;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            }
            self.persist_progress(client)?;
        }
    }

    /// Handles what the replication client received; returns an end when the session must
    /// stop.
    async fn receive(
        &mut self,
        received: Result<Option<WalMessage>, SessionError>,
    ) -> anyhow::Result<Option<SessionEnd>> {
        match received {
            Ok(Some(WalMessage::Data(data))) => {
                self.handle_pgoutput(&data).await?;
                Ok(None)
            }
            Ok(Some(WalMessage::KeepAlive { wal_end, .. })) => {
                self.metrics.set_server_wal_end(wal_end.0);
                self.idle_progress(wal_end);
                Ok(None)
            }
            Ok(None) => Ok(Some(SessionEnd::Lost("the server ended the stream".into()))),
            Err(error) => Ok(Some(SessionEnd::Lost(error.to_string()))),
        }
    }

    /// After `receive_timeout` of silence: is the link dead, or is the database just quiet? A
    /// quiet server sends nothing (our status updates spare it from pinging), but it keeps
    /// hearing us; on a dead link it does not.
    async fn dead_link(&mut self) -> Option<String> {
        let stale_after = (self.status_interval * 3 + Duration::from_secs(5)).as_secs_f64();
        if self.control.is_closed() {
            match postgres::connect(&self.database_url).await {
                Ok(client) => self.control = client,
                Err(error) => return Some(format!("receive watchdog: {error:#}")),
            }
        }
        let check = postgres::seconds_since_reply(&self.control, &self.slot);
        match tokio::time::timeout(Duration::from_secs(10), check).await {
            Ok(Ok(Some(seconds))) if seconds < stale_after => {
                tracing::debug!("quiet replication stream; the server heard us {seconds:.1} s ago");
                None
            }
            Ok(Ok(Some(seconds))) => Some(format!(
                "receive watchdog: nothing received for {:?} and the server last heard us \
                 {seconds:.0} s ago: the connection is dead",
                self.receive_timeout
            )),
            Ok(Ok(None)) => Some(format!(
                "receive watchdog: nothing received for {:?} and no walsender streams slot {}",
                self.receive_timeout, self.slot
            )),
            Ok(Err(error)) => Some(format!(
                "receive watchdog: cannot ask PostgreSQL: {error:#}"
            )),
            Err(_) => Some("receive watchdog: PostgreSQL did not answer within 10 s".into()),
        }
    }

    async fn commit(&mut self, end_lsn: Lsn) -> anyhow::Result<()> {
        self.outlet.end_transaction().await?;
        self.tx = None;
        self.outlet.progress.committed(end_lsn);
        Ok(())
    }

    /// The server's position with nothing for walstream before it: safe to confirm once
    /// nothing is open and everything is acknowledged, so an idle publication does not hold
    /// WAL back.
    fn idle_progress(&mut self, lsn: Lsn) {
        if self.tx.is_none() {
            self.outlet.count_acks();
            self.outlet.progress.idle(lsn);
        }
    }

    async fn handle_pgoutput(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let message = pgoutput::decode(data).map_err(|error| {
            anyhow::anyhow!(
                "cannot decode a pgoutput message ({error}); first bytes: {:02x?}",
                &data[..data.len().min(32)]
            )
        })?;
        match message {
            Message::Relation(relation) => {
                let info =
                    RelationInfo::new(&relation, self.outlet.encoder.naming(), &self.type_names);
                let published = Op::ALL.map(|op| {
                    self.metrics
                        .events_published
                        .with_label_values(&[&info.qualified, op.as_str()])
                });
                tracing::debug!(table = %info.qualified, columns = info.columns.len(), "relation");
                self.relations
                    .insert(relation.oid, RelationEntry { info, published });
            }
            Message::Type(type_info) => {
                self.type_names.insert(type_info.oid, type_info.name);
            }
            Message::Insert(insert) => {
                self.observe_for_backfill(insert.relation_oid, &[&insert.new]);
                self.publish_change(insert.relation_oid, Op::Insert, |encoder, tx, relation| {
                    encoder.insert(tx, relation, &insert.new)
                })
                .await?
            }
            Message::Update(update) => {
                match &update.old {
                    Some((_, old)) => {
                        self.observe_for_backfill(update.relation_oid, &[old, &update.new])
                    }
                    None => self.observe_for_backfill(update.relation_oid, &[&update.new]),
                }
                self.publish_change(update.relation_oid, Op::Update, |encoder, tx, relation| {
                    encoder.update(tx, relation, update.old.as_ref(), &update.new)
                })
                .await?
            }
            Message::Delete(delete) => {
                self.observe_for_backfill(delete.relation_oid, &[&delete.old]);
                self.publish_change(delete.relation_oid, Op::Delete, |encoder, tx, relation| {
                    encoder.delete(tx, relation, delete.old_kind, &delete.old)
                })
                .await?
            }
            Message::Truncate(truncate) => {
                for oid in &truncate.relation_oids {
                    self.publish_change(*oid, Op::Truncate, |encoder, tx, relation| {
                        Ok(encoder.truncate(
                            tx,
                            relation,
                            truncate.cascade,
                            truncate.restart_identity,
                        ))
                    })
                    .await?;
                }
            }
            Message::Begin(begin) => {
                self.tx = Some(Transaction::begin(
                    begin.xid,
                    begin.final_lsn,
                    begin.commit_time_micros,
                    self.timeline(),
                ))
            }
            Message::Commit(commit) => self.commit(commit.end_lsn).await?,
            Message::LogicalMessage(message) => self.logical_message(&message).await?,
            Message::Origin(_) => {}
        }
        Ok(())
    }

    /// Encodes and publishes one row change, unless its table is not watched or the stream
    /// already has it.
    async fn publish_change(
        &mut self,
        relation_oid: u32,
        op: Op,
        encode: impl FnOnce(
            &mut Encoder,
            &mut Transaction,
            &RelationInfo,
        ) -> Result<EncodedEvent, ColumnCountMismatch>,
    ) -> anyhow::Result<()> {
        let tx = self
            .tx
            .as_mut()
            .context("pgoutput sent a row change outside a transaction")?;
        let entry = self.relations.get(&relation_oid).with_context(|| {
            format!("pgoutput sent a change for relation {relation_oid} before describing it")
        })?;
        if !entry.info.watched {
            tx.skip_change();
            return Ok(());
        }
        let published = &entry.published[op as usize];
        self.outlet
            .publish(tx, published, |encoder, tx| {
                encode(encoder, tx, &entry.info)
            })
            .await
    }

    /// Lets a backfill under way know which row a live change touched.
    fn observe_for_backfill(&mut self, relation_oid: u32, tuples: &[&TupleData<'_>]) {
        if self.backfills.is_empty() {
            return;
        }
        if let (Some(tx), Some(entry)) = (&self.tx, self.relations.get(&relation_oid)) {
            let (xid, commit_lsn) = (tx.xid, tx.commit_lsn);
            self.backfills.observe(&entry.info, tuples, xid, commit_lsn);
        }
    }

    /// A backfill's message: starts or ends watching a table, or publishes a chunk's rows
    /// that no live change has overtaken.
    async fn backfill_message(&mut self, content: &[u8]) -> anyhow::Result<()> {
        let Some(tx) = self.tx.as_ref() else {
            tracing::warn!("passing over a backfill message outside a transaction");
            return Ok(());
        };
        let (header, rows) = match backfill::Header::decode(content) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::error!("passing over a malformed backfill message: {error}");
                return Ok(());
            }
        };
        let commit_lsn = tx.commit_lsn;
        match header.kind {
            backfill::Kind::Start => {
                tracing::info!(table = %header.table, backfill = header.backfill, "backfill started");
                self.backfills.start(&header, commit_lsn);
            }
            backfill::Kind::End => {
                if self.backfills.end(&header) {
                    tracing::info!(table = %header.table, backfill = header.backfill, "backfill ended");
                }
            }
            backfill::Kind::Chunk => {
                let verdict = match self.backfills.chunk(&header, &rows, commit_lsn) {
                    Ok(verdict) => verdict,
                    Err(error) => {
                        tracing::error!("passing over a malformed backfill chunk: {error}");
                        return Ok(());
                    }
                };
                let info = RelationInfo::new(
                    &header.relation(),
                    self.outlet.encoder.naming(),
                    &header
                        .columns
                        .iter()
                        .filter_map(|c| Some((c.type_oid, c.type_name.clone()?)))
                        .collect(),
                );
                if !info.watched {
                    tracing::warn!(table = %info.qualified, "passing over a backfill chunk of a table walstream does not watch");
                    return Ok(());
                }
                tracing::debug!(
                    table = %info.qualified,
                    rows = rows.len(),
                    dropped = verdict.dropped,
                    "backfill chunk"
                );
                let published = self
                    .metrics
                    .events_published
                    .with_label_values(&[&info.qualified, Op::Backfill.as_str()]);
                for (row, keep) in rows.iter().zip(verdict.keep) {
                    let tx = self
                        .tx
                        .as_mut()
                        .context("backfill chunk outside a transaction")?;
                    if !keep {
                        tx.skip_change();
                        continue;
                    }
                    self.outlet
                        .publish(tx, &published, |encoder, tx| {
                            encoder.backfill(tx, &info, row)
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn logical_message(
        &mut self,
        message: &pgoutput::LogicalMessage<'_>,
    ) -> anyhow::Result<()> {
        if message.prefix == HEARTBEAT_PREFIX && !message.transactional {
            self.idle_progress(message.lsn);
            return Ok(());
        }
        if message.prefix == backfill::PREFIX {
            return self.backfill_message(message.content).await;
        }
        let published = self
            .metrics
            .events_published
            .with_label_values(&["_message", "MESSAGE"]);
        let encode =
            |encoder: &mut Encoder, tx: &mut Transaction| Ok(encoder.logical_message(tx, message));
        match (&mut self.tx, message.transactional) {
            (Some(tx), true) => self.outlet.publish(tx, &published, encode).await,
            (_, _) => {
                let mut standalone = Transaction::standalone(message.lsn, self.timeline());
                self.outlet
                    .publish_alone(&mut standalone, &published, encode)
                    .await?;
                if self.tx.is_none() {
                    self.outlet.progress.committed(message.lsn);
                }
                Ok(())
            }
        }
    }

    /// Starts writing acknowledged progress to RocksDB, and once a write has landed reports
    /// it to PostgreSQL.
    fn persist_progress(&mut self, client: &ReplicationStream) -> anyhow::Result<()> {
        self.outlet.count_acks();
        if self.write_landed()? {
            client.confirm(self.confirmable());
        }
        // Before reading the clock: this runs after every turn of the stream's loop.
        if self.checkpoint_write.is_some() {
            return Ok(());
        }
        let Some(lsn) = self.outlet.progress.next_write(Instant::now()) else {
            return Ok(());
        };
        let checkpoint = self.checkpoint.clone();
        let (hold, timeline) = (self.backfills.hold(), self.timelines.session);
        self.checkpoint_write = Some(tokio::task::spawn_blocking(move || {
            checkpoint.store_progress(lsn, hold, timeline)
        }));
        Ok(())
    }

    /// Writes every acknowledged position now, after the write under way; for stopping.
    async fn persist_now(&mut self, client: Option<&ReplicationStream>) -> anyhow::Result<()> {
        if let Some(write) = self.checkpoint_write.take() {
            write
                .await
                .map_err(|e| anyhow::anyhow!("the checkpoint write failed: {e}"))??;
            self.mark_written();
        }
        self.outlet.count_acks();
        if let Some(lsn) = self.outlet.progress.final_write() {
            self.checkpoint
                .store_progress(lsn, self.backfills.hold(), self.timelines.session)?;
            self.mark_written();
        }
        if let Some(client) = client {
            client.confirm_now(self.confirmable());
        }
        Ok(())
    }

    /// What may be confirmed to PostgreSQL now.
    fn confirmable(&mut self) -> Lsn {
        let hold = self.backfills.hold();
        self.outlet.progress.confirmable(hold, Instant::now())
    }

    /// Whether the write under way has landed (and is counted).
    fn write_landed(&mut self) -> anyhow::Result<bool> {
        let Some(write) = self.checkpoint_write.as_mut() else {
            return Ok(false);
        };
        let Some(result) = write.now_or_never() else {
            return Ok(false);
        };
        self.checkpoint_write = None;
        result.map_err(|e| anyhow::anyhow!("the checkpoint write failed: {e}"))??;
        self.mark_written();
        Ok(true)
    }

    fn mark_written(&mut self) {
        let durable = self.outlet.progress.written();
        self.metrics.set_checkpoint(durable.0);
    }

    /// After a lost session: wait for every outstanding ack and persist what they confirm.
    async fn finish_in_flight(&mut self) -> anyhow::Result<()> {
        self.outlet.sink.flush().await?;
        self.persist_now(None).await?;
        let delivery = &mut self.outlet.delivery;
        delivery.skip_through = self.outlet.sink.last_position().or(delivery.skip_through);
        Ok(())
    }

    /// Before stopping on a fatal error: settle what is already in flight, so the checkpoint
    /// ends right before the event that failed.
    async fn salvage(&mut self, client: &ReplicationStream) {
        if tokio::time::timeout(Duration::from_secs(10), self.outlet.sink.flush())
            .await
            .is_ok()
        {
            if let Err(error) = self.persist_now(Some(client)).await {
                tracing::warn!("cannot store the checkpoint while stopping: {error}");
            }
        }
    }

    /// Graceful stop: drain acks, checkpoint, confirm to PostgreSQL, close the stream.
    async fn drain_and_stop(&mut self, client: Option<ReplicationStream>) -> anyhow::Result<()> {
        tracing::info!(
            in_flight = self.outlet.sink.in_flight(),
            "stopping: draining outstanding acks"
        );
        match tokio::time::timeout(DRAIN_TIMEOUT, self.outlet.sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                "could not drain every ack ({error}); unconfirmed events are re-sent at the next start"
            ),
            Err(_) => tracing::warn!(
                "acks still outstanding after {DRAIN_TIMEOUT:?}; unconfirmed events are re-sent at the next start"
            ),
        }
        let Some(client) = client else {
            return self.persist_now(None).await;
        };
        self.persist_now(Some(&client)).await?;
        self.wait_for_confirmation().await;
        if let Err(error) = client.close().await {
            tracing::debug!("closing the replication stream: {error}");
        }
        tracing::info!(checkpoint = %self.outlet.progress.durable(), "stopped");
        Ok(())
    }

    /// Waits (briefly) until PostgreSQL shows the slot confirmed at our checkpoint.
    async fn wait_for_confirmation(&mut self) {
        let deadline = Instant::now() + self.status_interval * 2 + Duration::from_secs(1);
        while Instant::now() < deadline {
            match self.slot_info().await {
                Ok(Some(slot))
                    if slot.confirmed_flush_lsn >= Some(self.outlet.progress.confirmed()) =>
                {
                    return
                }
                Ok(_) => {}
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(
            checkpoint = %self.outlet.progress.durable(),
            "PostgreSQL has not shown the slot confirmed yet; the checkpoint in RocksDB covers it"
        );
    }
}

/// Writes heartbeat messages into the WAL every `heartbeat_secs`, when configured.
fn spawn_heartbeat(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = Duration::from_secs(config.replication.heartbeat_secs);
    if every.is_zero() {
        return None;
    }
    let url = config.database.url.clone();
    Some(tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = postgres::connect(&url).await.ok();
            }
            let Some(connected) = &client else { continue };
            match postgres::emit_heartbeat(connected).await {
                Ok(()) => warned = false,
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(
                        "heartbeat failed: {}; grant EXECUTE on pg_logical_emit_message or set \
                         replication.heartbeat_secs = 0",
                        postgres::db_error(&error)
                    );
                }
                Err(_) => {}
            }
        }
    }))
}
