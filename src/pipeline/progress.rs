//! How far the pipeline has got: the events handed to the sink, those JetStream acknowledged,
//! the commits they complete, what the checkpoint holds, and what may be confirmed to
//! PostgreSQL. Bookkeeping only: the driver says what happened and asks what to do next; the
//! writes and the network are its business.
//!
//! The rules it keeps:
//! - a commit counts only once every event published before it is acknowledged;
//! - one checkpoint write at a time, never backwards, at most one per `interval`;
//! - the slot is confirmed only over what is written, held back by a backfill under way and by
//!   `replay_retention`, and what is confirmed never goes backwards.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Retention;
use crate::lsn::Lsn;

#[derive(Debug)]
pub struct Progress {
    /// Events handed to the sink since start.
    published: u64,
    /// Of them, acknowledged by JetStream: always the oldest ones, the sink acknowledges in order.
    acknowledged: u64,
    /// Commits waiting for their events: (events published before the commit, its end LSN).
    commits: VecDeque<(u64, Lsn)>,
    /// The newest position whose events are all acknowledged, not yet written.
    unwritten: Option<Lsn>,
    /// The checkpoint write under way.
    writing: Option<Lsn>,
    last_write: Option<Instant>,
    interval: Duration,
    /// What the checkpoint holds.
    durable: Lsn,
    /// Where the first session starts decoding when that is before the checkpoint (a
    /// backfill under way must see again the changes since it started).
    rewind_to: Option<Lsn>,
    confirmer: Confirmer,
}

impl Progress {
    /// Progress from the checkpoint's `durable` position, writing at most once per `interval`.
    pub fn new(
        durable: Lsn,
        rewind_to: Option<Lsn>,
        retention: Retention,
        interval: Duration,
    ) -> Self {
        Self {
            published: 0,
            acknowledged: 0,
            commits: VecDeque::new(),
            unwritten: None,
            writing: None,
            last_write: None,
            interval,
            durable,
            rewind_to,
            confirmer: Confirmer::new(retention, Lsn(0)),
        }
    }

    /// One event handed to the sink.
    pub fn published(&mut self) {
        self.published += 1;
    }

    /// `count` of the newest events published were taken back unsent (their transaction will
    /// be read again); no commit counts them.
    pub fn withdrawn(&mut self, count: u64) {
        self.published = self.published.saturating_sub(count).max(self.acknowledged);
    }

    /// A transaction (or a standalone message) ended after the events published so far.
    pub fn committed(&mut self, end_lsn: Lsn) {
        match self.commits.back_mut() {
            // Consecutive commits with no events between them: only the later one matters.
            Some((count, lsn)) if *count == self.published => *lsn = end_lsn,
            _ => self.commits.push_back((self.published, end_lsn)),
        }
        self.advance_commits();
    }

    /// JetStream has acknowledged `total` events since start, the oldest first.
    pub fn acknowledged(&mut self, total: u64) {
        self.acknowledged = self.acknowledged.max(total.min(self.published));
        self.advance_commits();
    }

    /// Every event published is acknowledged.
    pub fn is_settled(&self) -> bool {
        self.acknowledged == self.published
    }

    /// The server says the WAL reached `lsn` with nothing for walstream in between; when no
    /// transaction is open (the caller knows) and nothing is unacknowledged, it is safe to
    /// write, so an idle publication does not hold WAL back.
    pub fn idle(&mut self, lsn: Lsn) {
        if self.is_settled() {
            self.reached(lsn);
        }
    }

    /// The checkpoint write to start now, if any: none under way, the interval passed since
    /// the last one, and something acknowledged past what is written.
    pub fn next_write(&mut self, now: Instant) -> Option<Lsn> {
        let due = self
            .last_write
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if self.writing.is_some() || !due {
            return None;
        }
        let lsn = self.take_unwritten()?;
        self.writing = Some(lsn);
        self.last_write = Some(now);
        Some(lsn)
    }

    /// The write for stopping: everything acknowledged, whatever the interval. The caller has
    /// settled the write under way first.
    pub fn final_write(&mut self) -> Option<Lsn> {
        if self.writing.is_some() {
            return None;
        }
        let lsn = self.take_unwritten()?;
        self.writing = Some(lsn);
        Some(lsn)
    }

    /// The write under way has landed; returns what the checkpoint now holds.
    pub fn written(&mut self) -> Lsn {
        if let Some(lsn) = self.writing.take() {
            self.durable = self.durable.max(lsn);
        }
        self.durable
    }

    /// What the checkpoint holds.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// What may be confirmed to PostgreSQL now: the checkpoint, never past a backfill's
    /// `hold` (a restart must decode from there again), kept `replay_retention` behind.
    pub fn confirmable(&mut self, hold: Option<Lsn>, now: Instant) -> Lsn {
        let held = hold.map_or(self.durable, |hold| self.durable.min(hold));
        self.confirmer.confirmable(held, now)
    }

    /// What walstream has confirmed to PostgreSQL, or PostgreSQL shows confirmed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmer.confirmed()
    }

    /// Where the next session starts decoding, given the slot's confirmed position: the later
    /// of that and the checkpoint (the first time, a backfill's hold before it).
    pub fn resume_point(&mut self, slot_confirmed: Lsn) -> Lsn {
        self.confirmer.slot_confirmed(slot_confirmed);
        let from = match self.rewind_to.take() {
            Some(rewind) => self.durable.min(rewind),
            None => self.durable,
        };
        slot_confirmed.max(from)
    }

    /// The server's history now parts from the one walstream read at `switch` (a failover):
    /// nothing read past it counts any more, neither what the checkpoint holds nor what was
    /// confirmed. Called between sessions, with nothing in flight; the checkpoint on disk is
    /// the driver's to rewrite.
    pub fn diverged(&mut self, switch: Lsn) {
        self.durable = self.durable.min(switch);
        self.unwritten = self.unwritten.filter(|lsn| *lsn <= switch);
        self.commits.retain(|(_, lsn)| *lsn <= switch);
        self.confirmer.diverged(switch);
    }

    fn advance_commits(&mut self) {
        while let Some(&(count, lsn)) = self.commits.front() {
            if count > self.acknowledged {
                break;
            }
            self.commits.pop_front();
            self.reached(lsn);
        }
    }

    fn reached(&mut self, lsn: Lsn) {
        self.unwritten = Some(self.unwritten.map_or(lsn, |known| known.max(lsn)));
    }

    fn take_unwritten(&mut self) -> Option<Lsn> {
        self.unwritten.take().filter(|lsn| *lsn > self.durable)
    }
}

/// Decides which position walstream confirms to PostgreSQL, holding the slot `retention`
/// behind the durable checkpoint. What it confirms never goes backwards.
#[derive(Debug)]
struct Confirmer {
    retention: Retention,
    confirmed: Lsn,
    /// Durable positions not yet old enough to confirm (time retention only).
    aging: VecDeque<(Instant, Lsn)>,
}

impl Confirmer {
    /// `confirmed` is what the slot has confirmed already.
    fn new(retention: Retention, confirmed: Lsn) -> Self {
        Self {
            retention,
            confirmed,
            aging: VecDeque::new(),
        }
    }

    /// The position to confirm now that `durable` is in RocksDB.
    fn confirmable(&mut self, durable: Lsn, now: Instant) -> Lsn {
        let candidate = match self.retention {
            Retention::None => durable,
            Retention::Bytes(bytes) => Lsn(durable.0.saturating_sub(bytes)),
            Retention::Time(keep) => {
                // Sampled, so a week's retention is about a thousand entries, not millions;
                // the slot then keeps up to a thousandth of `keep` more than asked, never less.
                let every = keep / 1024;
                let sample = self.aging.back().is_none_or(|&(at, lsn)| {
                    lsn < durable && now.saturating_duration_since(at) >= every
                });
                if sample {
                    self.aging.push_back((now, durable));
                }
                let mut candidate = self.confirmed;
                while let Some(&(at, lsn)) = self.aging.front() {
                    if now.saturating_duration_since(at) < keep {
                        break;
                    }
                    candidate = lsn;
                    self.aging.pop_front();
                }
                candidate
            }
        };
        self.confirmed = self.confirmed.max(candidate);
        self.confirmed
    }

    fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    fn diverged(&mut self, switch: Lsn) {
        self.confirmed = self.confirmed.min(switch);
        self.aging.retain(|(_, lsn)| *lsn <= switch);
    }

    /// What PostgreSQL shows the slot confirmed at: nothing below it needs holding back.
    fn slot_confirmed(&mut self, lsn: Lsn) {
        self.confirmed = self.confirmed.max(lsn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    fn progress() -> Progress {
        Progress::new(Lsn(10), None, Retention::None, INTERVAL)
    }

    /// Writes what is due now and lands it.
    fn write(progress: &mut Progress, now: Instant) -> Option<Lsn> {
        let lsn = progress.next_write(now)?;
        progress.written();
        Some(lsn)
    }

    #[test]
    fn a_failover_takes_back_what_was_read_past_the_switch_point() {
        let now = Instant::now();
        let mut progress = progress();
        progress.committed(Lsn(500));
        assert_eq!(write(&mut progress, now), Some(Lsn(500)));
        assert_eq!(progress.confirmable(None, now), Lsn(500));
        progress.diverged(Lsn(300));
        assert_eq!(progress.durable(), Lsn(300));
        assert_eq!(progress.confirmed(), Lsn(300));
        assert_eq!(progress.resume_point(Lsn(250)), Lsn(300));
        progress.committed(Lsn(320));
        assert_eq!(write(&mut progress, now + INTERVAL), Some(Lsn(320)));
        assert_eq!(
            progress.durable(),
            Lsn(320),
            "written again from the switch point on"
        );
    }

    #[test]
    fn a_commit_counts_once_every_event_before_it_is_acknowledged() {
        let now = Instant::now();
        let mut progress = progress();
        progress.published();
        progress.published();
        progress.committed(Lsn(100));
        progress.published();
        progress.committed(Lsn(200));
        progress.acknowledged(1);
        assert_eq!(
            progress.next_write(now),
            None,
            "half of the first transaction"
        );
        progress.acknowledged(2);
        assert_eq!(write(&mut progress, now), Some(Lsn(100)));
        progress.acknowledged(3);
        let later = now + INTERVAL;
        assert_eq!(write(&mut progress, later), Some(Lsn(200)));
        assert_eq!(progress.durable(), Lsn(200));
    }

    #[test]
    fn commits_without_events_between_them_merge() {
        let mut progress = progress();
        progress.published();
        progress.committed(Lsn(100));
        progress.committed(Lsn(150));
        progress.committed(Lsn(180));
        assert_eq!(progress.commits.len(), 1);
        progress.acknowledged(1);
        assert_eq!(progress.next_write(Instant::now()), Some(Lsn(180)));
    }

    #[test]
    fn acknowledgements_never_count_more_than_was_published() {
        let mut progress = progress();
        progress.published();
        progress.acknowledged(5);
        assert!(progress.is_settled());
        progress.published();
        progress.committed(Lsn(100));
        assert_eq!(progress.next_write(Instant::now()), None);
    }

    #[test]
    fn an_idle_position_counts_only_when_everything_is_acknowledged() {
        let now = Instant::now();
        let mut progress = progress();
        progress.published();
        progress.idle(Lsn(500));
        assert_eq!(progress.next_write(now), None, "an event is unacknowledged");
        progress.acknowledged(1);
        progress.idle(Lsn(500));
        assert_eq!(write(&mut progress, now), Some(Lsn(500)));
    }

    #[test]
    fn one_write_at_a_time_and_never_backwards() {
        let now = Instant::now();
        let mut progress = progress();
        progress.committed(Lsn(100));
        assert_eq!(progress.next_write(now), Some(Lsn(100)));
        progress.committed(Lsn(200));
        let later = now + INTERVAL;
        assert_eq!(progress.next_write(later), None, "the first is under way");
        assert_eq!(progress.written(), Lsn(100));
        assert_eq!(progress.next_write(later), Some(Lsn(200)));
        assert_eq!(progress.written(), Lsn(200));
        // An idle position before the checkpoint (the server's view after a restart).
        progress.idle(Lsn(150));
        assert_eq!(progress.next_write(later + INTERVAL), None);
        assert_eq!(progress.durable(), Lsn(200));
    }

    #[test]
    fn writes_wait_for_the_interval_but_a_stop_does_not() {
        let now = Instant::now();
        let mut progress = progress();
        progress.committed(Lsn(100));
        assert_eq!(write(&mut progress, now), Some(Lsn(100)));
        progress.committed(Lsn(200));
        assert_eq!(progress.next_write(now + INTERVAL / 2), None);
        assert_eq!(progress.final_write(), Some(Lsn(200)));
        assert_eq!(progress.written(), Lsn(200));
        assert_eq!(progress.final_write(), None, "nothing new");
    }

    #[test]
    fn confirmations_stop_at_a_backfills_hold() {
        let mut progress = progress();
        progress.committed(Lsn(300));
        write(&mut progress, Instant::now());
        assert_eq!(
            progress.confirmable(Some(Lsn(120)), Instant::now()),
            Lsn(120)
        );
        assert_eq!(progress.confirmable(None, Instant::now()), Lsn(300));
        // Never backwards, even when a new backfill holds before it.
        assert_eq!(
            progress.confirmable(Some(Lsn(50)), Instant::now()),
            Lsn(300)
        );
        assert_eq!(progress.confirmed(), Lsn(300));
    }

    #[test]
    fn a_session_resumes_at_the_later_of_slot_and_checkpoint_rewound_once_for_a_backfill() {
        let mut progress = Progress::new(Lsn(400), Some(Lsn(250)), Retention::None, INTERVAL);
        assert_eq!(
            progress.resume_point(Lsn(200)),
            Lsn(250),
            "the backfill's hold"
        );
        assert_eq!(progress.confirmed(), Lsn(200));
        assert_eq!(
            progress.resume_point(Lsn(200)),
            Lsn(400),
            "only the first session"
        );
        assert_eq!(progress.resume_point(Lsn(450)), Lsn(450));
    }

    #[test]
    fn confirmations_stay_behind_by_bytes_and_never_go_back() {
        let now = Instant::now();
        let mut confirmer = Confirmer::new(Retention::Bytes(1000), Lsn(50));
        assert_eq!(confirmer.confirmable(Lsn(600), now), Lsn(50));
        assert_eq!(confirmer.confirmable(Lsn(5000), now), Lsn(4000));
        // A reset moves the checkpoint back; the slot's confirmation stays.
        assert_eq!(confirmer.confirmable(Lsn(100), now), Lsn(4000));
    }

    #[test]
    fn confirmations_stay_behind_by_time() {
        let start = Instant::now();
        let mut confirmer = Confirmer::new(Retention::Time(Duration::from_secs(60)), Lsn(0));
        assert_eq!(confirmer.confirmable(Lsn(100), start), Lsn(0));
        let later = start + Duration::from_secs(30);
        assert_eq!(confirmer.confirmable(Lsn(200), later), Lsn(0));
        let minute = start + Duration::from_secs(61);
        assert_eq!(confirmer.confirmable(Lsn(300), minute), Lsn(100));
        let two = start + Duration::from_secs(125);
        assert_eq!(confirmer.confirmable(Lsn(300), two), Lsn(300));
    }

    #[test]
    fn no_retention_confirms_the_checkpoint() {
        let mut confirmer = Confirmer::new(Retention::None, Lsn(0));
        assert_eq!(confirmer.confirmable(Lsn(42), Instant::now()), Lsn(42));
    }
}
