//! The NATS plumbing the sink, the commands and GraphQL share: connecting with the configured
//! servers, credentials and TLS; walstream's stream and its messages; key-value buckets.

mod connect;
mod key_value;
mod stream;

pub use connect::{connect, jetstream_for_command};
pub use key_value::ensure_key_value;
pub use stream::{ensure_stream, existing_stream, message_at};
