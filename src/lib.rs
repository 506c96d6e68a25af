//! walstream: PostgreSQL logical replication (`pgoutput`) to NATS JetStream.
//!
//! The pipeline, in the order data flows:
//! [`source`] (replication slot) → [`pgoutput`] (decoder) → [`event`] (JSON envelope) →
//! [`sink`] (JetStream), with [`checkpoint`] (RocksDB) beside it and [`pipeline`] driving them.
//! [`postgres`] is the normal connection (slot, publication, catalog); [`http`] serves
//! `/health` and `/metrics` from [`metrics`].
//!
//! Beside the pipeline, [`graphql`] serves the FraiseQL-style API: queries from views,
//! mutations through SQL functions, subscriptions from the change stream.

#[cfg(feature = "server")]
pub mod app;
pub mod backfill;
#[cfg(feature = "server")]
pub mod check;
#[cfg(feature = "server")]
pub mod checkpoint;
pub mod config;
#[cfg(feature = "server")]
pub mod dev;
pub mod event;
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod graphql;
pub mod http;
#[cfg(feature = "server")]
pub mod lease;
pub mod local;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
#[cfg(feature = "server")]
pub mod pipeline;
pub mod postgres;
pub mod replay;
pub mod secrets;
pub mod sink;
#[cfg(feature = "server")]
pub mod slot_watch;
pub mod source;
#[cfg(feature = "server")]
pub mod status;
pub mod tail;
pub mod tls;
