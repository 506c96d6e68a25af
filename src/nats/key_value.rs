//! JetStream key-value buckets (the HA lease, backfill progress).

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// Opens a key-value bucket, creating it if missing. The bucket's stream is created here, with
/// the settings async-nats would use, because its own `create_key_value` first reads account
/// information that nats-server 2.9 answers in a form it cannot parse.
pub async fn ensure_key_value(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> anyhow::Result<jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            num_replicas: replicas.max(1),
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    if let Err(error) = created {
        // Another process may have created it meanwhile.
        if js.get_key_value(bucket).await.is_err() {
            anyhow::bail!("cannot create the key-value bucket {bucket}: {error}");
        }
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the key-value bucket {bucket}: {e}"))
}
