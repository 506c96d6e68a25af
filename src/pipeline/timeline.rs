//! Which WAL history an LSN belongs to: the server's timeline, and where each earlier timeline
//! ended, read from its TIMELINE_HISTORY file. After a failover the promoted standby's history
//! shares the old primary's WAL only up to the switch point; anything walstream read from the
//! old primary at or past it never happened for the new one.

use crate::lsn::{parse_lsn, Lsn};

/// A server's timeline and the history that led to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The timeline the server writes now.
    pub current: u32,
    /// Each earlier timeline and the LSN at which it ended, oldest first.
    ended: Vec<(u32, Lsn)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimelineError {
    #[error(
        "timeline history file, line {line}: `{text}` is not `<timeline> <switch LSN> [reason]`"
    )]
    Malformed { line: usize, text: String },
    #[error(
        "walstream last streamed from timeline {seen}, and this server is on timeline {current}, \
         {why}: it is not the server walstream streamed from, nor one promoted after it (the \
         old primary back after a failover, or another cluster). walstream stops rather than \
         publish a history that contradicts the stream's; point database.url at the current \
         primary"
    )]
    NotAnAncestor {
        seen: u32,
        current: u32,
        why: &'static str,
    },
}

impl History {
    /// A server on timeline 1, or any server whose history does not matter.
    pub fn first(current: u32) -> Self {
        Self {
            current,
            ended: Vec::new(),
        }
    }

    /// Parses the TIMELINE_HISTORY file of timeline `current`: one line per earlier timeline,
    /// `<timeline>\t<switch point>\t<reason>`; blank lines and `#` comments are passed over.
    pub fn parse(current: u32, content: &str) -> Result<Self, TimelineError> {
        let mut ended = Vec::new();
        for (index, line) in content.lines().enumerate() {
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let malformed = || TimelineError::Malformed {
                line: index + 1,
                text: text.to_owned(),
            };
            let mut fields = text.split_whitespace();
            let timeline = fields
                .next()
                .and_then(|t| t.parse::<u32>().ok())
                .ok_or_else(malformed)?;
            let switch = fields
                .next()
                .and_then(|l| parse_lsn(l).ok())
                .ok_or_else(malformed)?;
            ended.push((timeline, switch));
        }
        Ok(Self { current, ended })
    }

    /// Where `timeline` ended in this history: `None` while it is the current one.
    pub fn ended_at(&self, timeline: u32) -> Result<Option<Lsn>, TimelineError> {
        if timeline == self.current {
            return Ok(None);
        }
        let not_ancestor = |why| TimelineError::NotAnAncestor {
            seen: timeline,
            current: self.current,
            why,
        };
        if timeline > self.current {
            return Err(not_ancestor("an earlier one"));
        }
        self.ended
            .iter()
            .find(|(t, _)| *t == timeline)
            .map(|(_, lsn)| Some(*lsn))
            .ok_or_else(|| not_ancestor("whose history does not contain it"))
    }

    /// The first LSN of `timeline`'s WAL that this history does not share: `None` when all of
    /// it is shared (the same timeline).
    pub fn diverges_at(&self, timeline: Option<u32>) -> Result<Option<Lsn>, TimelineError> {
        match timeline {
            Some(timeline) => self.ended_at(timeline),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history file PostgreSQL 17 wrote for timeline 3 after two promotions.
    const TIMELINE_3: &str = "1\t0/3000158\tno recovery target specified\n\n\
                              2\t0/5A2C1E0\tno recovery target specified\n";

    #[test]
    fn reads_where_each_earlier_timeline_ended() {
        let history = History::parse(3, TIMELINE_3).unwrap();
        assert_eq!(history.ended_at(1), Ok(Some(Lsn(0x3000158))));
        assert_eq!(history.ended_at(2), Ok(Some(Lsn(0x5A2C1E0))));
        assert_eq!(history.ended_at(3), Ok(None));
        assert_eq!(history.diverges_at(None), Ok(None));
    }

    #[test]
    fn a_later_or_foreign_timeline_is_refused() {
        let history = History::parse(2, "1\t0/3000158\tno recovery target specified\n").unwrap();
        let later = history.ended_at(3).unwrap_err().to_string();
        assert!(
            later.contains("timeline 3") && later.contains("an earlier one"),
            "{later}"
        );
        let foreign = History::first(4).ended_at(2).unwrap_err().to_string();
        assert!(foreign.contains("does not contain it"), "{foreign}");
    }

    #[test]
    fn a_malformed_line_is_named() {
        let error = History::parse(2, "# comment\n1 nonsense\n").unwrap_err();
        assert_eq!(
            error,
            TimelineError::Malformed {
                line: 2,
                text: "1 nonsense".into()
            }
        );
    }
}
