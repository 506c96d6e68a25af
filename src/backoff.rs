//! Exponential backoff for reconnecting to PostgreSQL and NATS and for re-syncing the stream.

use std::time::{Duration, Instant};

/// Exponential backoff from 100 ms to 10 s.
pub struct Backoff {
    next: Duration,
    started: Instant,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
            started: Instant::now(),
        }
    }

    pub fn peek(&self) -> Duration {
        self.next
    }

    pub fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        current
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
