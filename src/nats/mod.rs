//! The NATS plumbing the sink, the commands and GraphQL share: connecting with the configured
//! servers, credentials and TLS; walstream's own publishing connection and the frames it
//! writes; what the server supports; streams and their messages; key-value buckets.

mod connect;
mod key_value;
mod publisher;
mod server;
mod stream;
pub mod wire;

pub use connect::{connect, jetstream_for_command};
pub use key_value::ensure_key_value;
pub use publisher::{PublishError, Publisher};
pub use server::{atomic_batches_with_ids, fast_ingest_batches, server_features, ServerFeatures};
pub use stream::{ensure_stream, existing_stream, message_at, BatchSettings};
