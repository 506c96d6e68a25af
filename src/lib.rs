//! walstream: PostgreSQL logical replication (`pgoutput`) to NATS JetStream.
//!
//! - [`pipeline`]: the streamer, stage by stage in the order data flows: the replication
//!   source, the `pgoutput` decoder, the event, the JetStream sink, with the checkpoint and the
//!   progress beside them.
//! - [`graphql`]: the FraiseQL-style API beside it: queries from views, mutations through SQL
//!   functions, subscriptions from the change stream.
//! - [`commands`]: what the `walstream` binary runs (`stream`, `setup`, `status`, …).
//! - Shared by them: [`config`], [`postgres`] (the normal connection), [`nats`] (connections,
//!   the stream, key-value buckets), [`http`] and [`metrics`], [`tls`], [`secrets`],
//!   [`backoff`], [`lsn`], [`op`].
//! - [`local`] runs local servers for `walstream dev` and the tests; [`fuzzing`] holds the
//!   fuzz targets' bodies.

pub mod backoff;
#[cfg(feature = "server")]
pub mod commands;
pub mod config;
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod graphql;
pub mod http;
pub mod local;
pub mod lsn;
pub mod metrics;
pub mod nats;
pub mod op;
pub mod pipeline;
pub mod postgres;
pub mod secrets;
pub mod tls;
