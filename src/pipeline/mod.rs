//! The streamer: committed changes from a replication slot to a JetStream stream, in WAL
//! order, each exactly once.
//!
//! The stages, in the order data flows:
//! [`source`] (the slot's replication stream) → [`pgoutput`] (the decoder) → [`event`] (the
//! JSON envelope) → [`sink`] (JetStream). Beside them: [`progress`] (what is published,
//! acknowledged, persisted, confirmable), [`checkpoint`] (RocksDB), [`delivery`] (what is
//! already in the stream, what a replay re-delivers), [`history`] (walstream's events read
//! back from the stream), [`timeline`] (which WAL history a position belongs to, across a
//! failover), [`backfill`] (a table's rows emitted through the WAL). [`driver`]
//! runs them; [`lease`] decides which instance does, [`slot_watch`] reports the slot's health.

pub mod backfill;
#[cfg(feature = "server")]
pub mod checkpoint;
pub mod delivery;
#[cfg(feature = "server")]
pub mod driver;
pub mod event;
pub mod history;
#[cfg(feature = "server")]
pub mod lease;
pub mod pgoutput;
pub mod progress;
pub mod sink;
#[cfg(feature = "server")]
pub mod slot_watch;
pub mod source;
pub mod timeline;

#[cfg(feature = "server")]
pub use driver::run;
