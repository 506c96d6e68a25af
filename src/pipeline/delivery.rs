//! Which changes are published: the stream's last message decides where the first session
//! resumes (`ResumePlan`), then each change is either already in the stream, delivered again
//! as part of a replay, or a first delivery (`Delivery`).

use crate::lsn::Lsn;
use crate::pipeline::event::replay::{Replay, ReplayHeaders};
use crate::pipeline::event::{Position, Transaction};

/// Where the first replication session starts, as the stream's last message decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePlan {
    /// Re-decode from here, whatever the checkpoint says (it may predate a reset).
    pub from: Option<Lsn>,
    /// Events at or before this are in the stream already.
    pub skip_through: Option<Position>,
    pub replay: Option<Replay>,
}

impl ResumePlan {
    /// `tail_position` and `tail_replay` are read from the stream's last message.
    pub fn from_tail(tail_position: Option<Position>, tail_replay: Option<ReplayHeaders>) -> Self {
        match (tail_replay, tail_position) {
            // The marker: nothing of the replay is published yet.
            (
                Some(ReplayHeaders {
                    replay,
                    from: Some(from),
                }),
                _,
            ) => Self {
                from: Some(from),
                skip_through: None,
                replay: Some(replay),
            },
            // A replayed event: the replay stopped there. The checkpoint may still hold the
            // position from before the reset, so resume from the event itself.
            (Some(ReplayHeaders { replay, from: None }), Some(last)) => Self {
                from: Some(last.commit_lsn),
                skip_through: Some(last),
                replay: (last < replay.through).then_some(replay),
            },
            (_, position) => Self {
                from: None,
                skip_through: position,
                replay: None,
            },
        }
    }
}

/// Decides, change by change in WAL order, whether an event is published (not already in the
/// stream) and whether as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Events at or before this position are already in the stream: a restart re-reads them
    /// from the slot, and they are not published twice.
    pub skip_through: Option<Position>,
    /// The replay under way, if any: events it covers are published again, marked.
    pub replay: Option<Replay>,
}

impl Delivery {
    pub fn new(plan: &ResumePlan) -> Self {
        Self {
            skip_through: plan.skip_through,
            replay: plan.replay,
        }
    }

    /// Whether the transaction's next change is published; if not, its position is passed
    /// over. A published change is marked as a replay exactly when the replay covers it.
    pub fn admit(&mut self, tx: &mut Transaction) -> bool {
        let position = tx.peek_position();
        if self.skip_through.is_some_and(|last| position <= last) {
            tx.skip_change();
            return false;
        }
        self.skip_through = None;
        let covering = self.replay.filter(|replay| replay.covers(position));
        if let (Some(ended), None) = (self.replay, covering) {
            tracing::info!(
                replay = ended.id,
                "replay finished: every event it covers is delivered again"
            );
            self.replay = None;
        }
        tx.set_replay(covering);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn at(lsn: u64, seq: u64) -> Position {
        Position::at(Lsn(lsn), seq)
    }

    #[test]
    fn the_tail_decides_where_to_resume() {
        let replay = Replay {
            id: 1,
            through: at(500, 2),
        };
        // An ordinary tail: resume from the checkpoint, skip what is stored.
        let plain = ResumePlan::from_tail(Some(at(500, 2)), None);
        assert_eq!(plain.from, None);
        assert_eq!(plain.skip_through, Some(at(500, 2)));
        // The marker: re-decode from its LSN, skip nothing.
        let marker = ReplayHeaders {
            replay,
            from: Some(Lsn(100)),
        };
        let requested = ResumePlan::from_tail(None, Some(marker));
        assert_eq!(requested.from, Some(Lsn(100)));
        assert_eq!(requested.skip_through, None);
        assert_eq!(requested.replay, Some(replay));
        // Stopped mid-replay: carry on after the last replayed event.
        let replayed = ReplayHeaders { replay, from: None };
        let midway = ResumePlan::from_tail(Some(at(300, 0)), Some(replayed));
        assert_eq!(midway.from, Some(Lsn(300)));
        assert_eq!(midway.skip_through, Some(at(300, 0)));
        assert_eq!(midway.replay, Some(replay));
        // Stopped on the replay's last event: the replay is over.
        let done = ResumePlan::from_tail(Some(at(500, 2)), Some(replayed));
        assert_eq!(done.replay, None);
    }

    #[test]
    fn delivery_skips_what_is_stored_and_marks_what_the_replay_covers() {
        let replay = Replay {
            id: 3,
            through: at(200, 1),
        };
        let mut delivery = Delivery {
            skip_through: Some(at(200, 0)),
            replay: Some(replay),
        };
        let mut tx = Transaction::begin(7, Lsn(200), 0, 1);
        assert!(!delivery.admit(&mut tx), "already in the stream");
        assert!(delivery.admit(&mut tx), "the next one is not");
        assert_eq!(tx.replay(), Some(replay));
        assert_eq!(delivery.skip_through, None);
        tx.skip_change();
        assert!(delivery.admit(&mut tx), "past the replay's end");
        assert_eq!((tx.replay(), delivery.replay), (None, None));
    }
}
