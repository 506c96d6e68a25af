//! GraphQL clients for tests: a WebSocket subscriber and signed tokens.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// An HS256 token with `claims`, issued by `issuer`, expiring in `expires_in` seconds.
pub fn sign_with(mut claims: Value, secret: &str, issuer: &str, expires_in: i64) -> String {
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() as i64 + expires_in);
    claims["iss"] = json!(issuer);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

/// A GraphQL WebSocket client speaking `graphql-transport-ws` or the legacy `graphql-ws`.
pub struct Subscriber {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    legacy: bool,
}

impl Subscriber {
    pub async fn connect(port: u16, token: &str, legacy: bool) -> anyhow::Result<Self> {
        let mut request = format!("ws://127.0.0.1:{port}/graphql").into_client_request()?;
        let protocol = if legacy {
            "graphql-ws"
        } else {
            "graphql-transport-ws"
        };
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        let mut subscriber = Self { socket, legacy };
        subscriber
            .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}))
            .await?;
        let ack = subscriber.next_message().await?;
        anyhow::ensure!(ack["type"] == "connection_ack", "no ack: {ack}");
        Ok(subscriber)
    }

    pub async fn send(&mut self, message: Value) -> anyhow::Result<()> {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await?;
        Ok(())
    }

    pub async fn subscribe(&mut self, query: &str) -> anyhow::Result<()> {
        let kind = if self.legacy { "start" } else { "subscribe" };
        self.send(json!({"id": "1", "type": kind, "payload": {"query": query}}))
            .await?;
        // The server sets up the feed after reading the message; give it a moment so the
        // events the test makes next are after the subscription, not before.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(())
    }

    pub async fn next_message(&mut self) -> anyhow::Result<Value> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .map_err(|_| anyhow::anyhow!("no message within 20 s"))?
                .ok_or_else(|| anyhow::anyhow!("the socket closed"))??;
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text)?;
                if value["type"] != "ka" && value["type"] != "ping" {
                    return Ok(value);
                }
            }
        }
    }

    /// The next event's payload data.
    pub async fn next_event(&mut self) -> anyhow::Result<Value> {
        let message = self.next_message().await?;
        let kind = if self.legacy { "data" } else { "next" };
        anyhow::ensure!(message["type"] == kind, "expected {kind}: {message}");
        Ok(message["payload"].clone())
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(quiet, self.socket.next()).await
        {
            panic!("unexpected message: {text}");
        }
    }
}
