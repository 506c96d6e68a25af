//! High availability: a lease in a JetStream key-value bucket decides which of several walstream
//! instances streams a slot; the others stand by and take over when it expires.
//!
//! The lease is for coordination, not the only fence: PostgreSQL lets one walsender hold a slot
//! at a time, and every publish names the stream sequence it expects to follow, so an instance
//! that lost its lease without knowing cannot stream or publish beside its successor.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use tokio::sync::watch;

/// The bucket holding one lease per slot.
pub const BUCKET: &str = "walstream_leases";

/// The lease on a slot, held by this instance.
pub struct Lease {
    store: kv::Store,
    key: String,
    holder: String,
    revision: u64,
    ttl: Duration,
}

/// Who this instance is, as other instances see it in the lease.
pub fn holder_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned());
    let nonce = time::OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000;
    format!("{host}:{}:{nonce}", std::process::id())
}

/// Waits until this instance holds the lease on `key`; `None` when `shutdown` turns on first.
pub async fn acquire(
    store: kv::Store,
    key: &str,
    holder: &str,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Lease> {
    let mut reported = None;
    loop {
        match store.create(key, holder.to_owned().into()).await {
            Ok(revision) => {
                return Some(Lease {
                    store,
                    key: key.to_owned(),
                    holder: holder.to_owned(),
                    revision,
                    ttl,
                })
            }
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                let current = store
                    .get(key)
                    .await
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                if current != reported {
                    tracing::info!(
                        slot = key,
                        active = current.as_deref().unwrap_or("?"),
                        "standing by: another instance streams the slot"
                    );
                    reported = current;
                }
            }
            Err(error) => tracing::warn!("cannot reach the lease bucket {BUCKET}: {error}"),
        }
        if *shutdown.borrow() {
            return None;
        }
        tokio::select! {
            _ = tokio::time::sleep(ttl / 5) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

impl Lease {
    /// Renews the lease until `stop` turns on. Turns `lost` on when another instance holds
    /// it, or when it could not be renewed for a whole `ttl` (it may have expired).
    pub async fn keep(
        mut self,
        lost: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.ttl / 3) => {}
                _ = stop.changed() => return self,
            }
            if *stop.borrow() {
                return self;
            }
            let update = self
                .store
                .update(&self.key, self.holder.clone().into(), self.revision);
            match tokio::time::timeout(self.ttl / 3, update).await {
                Ok(Ok(revision)) => {
                    self.revision = revision;
                    renewed = Instant::now();
                }
                Ok(Err(error)) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(slot = %self.key, "the lease was taken over by another instance");
                    let _ = lost.send(true);
                    return self;
                }
                Ok(Err(error)) => tracing::warn!("cannot renew the lease: {error}"),
                Err(_) => tracing::warn!("renewing the lease timed out"),
            }
            if renewed.elapsed() >= self.ttl {
                tracing::warn!(
                    slot = %self.key,
                    "the lease could not be renewed for {:?}: giving up the slot",
                    self.ttl
                );
                let _ = lost.send(true);
                return self;
            }
        }
    }

    /// Gives the lease up, so a standby takes over at once rather than after it expires.
    pub async fn release(self) {
        let still_ours = self.store.get(&self.key).await.ok().flatten();
        if still_ours.as_deref() == Some(self.holder.as_bytes()) {
            if let Err(error) = self.store.delete(&self.key).await {
                tracing::warn!("cannot release the lease (it expires on its own): {error}");
            }
        }
    }
}
