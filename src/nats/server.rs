//! What the NATS server is: its version, and the JetStream API level it reports (2.11+; 2.9 and
//! 2.10 report none), which says which JetStream features it has.

use std::time::Duration;

use async_nats::Client;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerFeatures {
    /// `2.15.1`, as the server announces itself.
    pub version: String,
    /// `$JS.API.INFO`'s `api.level`; `None` before nats-server 2.11.
    pub api_level: Option<u64>,
}

impl std::fmt::Display for ServerFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats-server {}", self.version)?;
        match self.api_level {
            Some(level) => write!(f, ", JetStream API level {level}"),
            None => write!(f, ", no JetStream API level (before 2.11)"),
        }
    }
}

/// Asks the server for its JetStream account information. An error names why JetStream is not
/// available (disabled, not for this account, no answer).
pub async fn server_features(client: &Client) -> Result<ServerFeatures, String> {
    // A raw request: async-nats' typed account info does not parse nats-server 2.9's reply.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_owned())?
    .map_err(|e| e.to_string())?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).map_err(|e| format!("unreadable reply: {e}"))?;
    features(&info, client.server_info().version)
}

/// Whether a server announcing `version` stores atomic batches whose messages carry
/// `Nats-Msg-Id` (nats-server 2.12.1+; 2.12.0 refuses the header inside a batch, and older
/// servers ignore a stream's `allow_atomic` and store batch messages one by one).
pub fn atomic_batches_with_ids(version: &str) -> bool {
    version_at_least(version, (2, 12, 1))
}

/// Whether a server announcing `version` takes fast-ingest batches (nats-server 2.14+, a
/// stream's `allow_batched`).
pub fn fast_ingest_batches(version: &str) -> bool {
    version_at_least(version, (2, 14, 0))
}

/// `2.12.8`, `2.15.1-RC.2`, `v2.10.26`: compared by their numbers; an unreadable version is
/// taken for an old server.
fn version_at_least(version: &str, wanted: (u64, u64, u64)) -> bool {
    let mut numbers = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u64>().ok());
    let mut next = || numbers.next().flatten();
    match (next(), next(), next()) {
        (Some(major), Some(minor), patch) => (major, minor, patch.unwrap_or(0)) >= wanted,
        _ => false,
    }
}

fn features(info: &serde_json::Value, version: String) -> Result<ServerFeatures, String> {
    if let Some(error) = info.get("error") {
        return Err(error["description"]
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned));
    }
    Ok(ServerFeatures {
        version,
        api_level: info["api"]["level"].as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn atomic_batches_with_ids_need_2_12_1() {
        for old in ["2.9.10", "2.10.26", "2.11.11", "2.12.0", "nonsense", ""] {
            assert!(!atomic_batches_with_ids(old), "{old}");
        }
        for new in [
            "2.12.1",
            "2.12.8",
            "2.14.6",
            "2.15.1",
            "v2.15.1",
            "2.16.0-RC.1",
            "3.0.0",
        ] {
            assert!(atomic_batches_with_ids(new), "{new}");
        }
    }

    #[test]
    fn fast_ingest_batches_need_2_14() {
        for old in ["2.9.10", "2.11.11", "2.12.8", "2.13.9", ""] {
            assert!(!fast_ingest_batches(old), "{old}");
        }
        for new in ["2.14.0", "2.14.6", "2.15.1", "v2.16.0-RC.1", "3.0.0"] {
            assert!(fast_ingest_batches(new), "{new}");
        }
    }

    #[test]
    fn the_api_level_is_read_where_servers_report_it() {
        // As nats-server 2.15.1 answers (trimmed), and 2.9.10.
        let new = json!({"type": "io.nats.jetstream.api.v1.account_info_response",
            "memory": 0, "api": {"level": 5, "total": 3, "errors": 0}});
        let old = json!({"type": "io.nats.jetstream.api.v1.account_info_response",
            "memory": 0, "api": {"total": 3, "errors": 0}});
        assert_eq!(
            features(&new, "2.15.1".into()).map(|f| f.api_level),
            Ok(Some(5))
        );
        assert_eq!(
            features(&old, "2.9.10".into()).map(|f| f.api_level),
            Ok(None)
        );
        let disabled = json!({"error": {"code": 503, "err_code": 10039,
            "description": "jetstream not enabled for account"}});
        assert_eq!(
            features(&disabled, "2.9.10".into()),
            Err("jetstream not enabled for account".to_owned())
        );
    }
}
