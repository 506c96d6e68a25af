//! Debian's headless Chromium, driven over the DevTools protocol, for tests of the pages
//! walstream serves: open a page, run JavaScript in it, type text as a user would.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless, with a fresh profile and none of its own network traffic.
    pub fn start() -> anyhow::Result<Self> {
        anyhow::ensure!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: apt-get install -y chromium (scripts/install-deps does)"
        );
        let profile = tempfile::tempdir()?;
        let port = walstream::local::free_port()?;
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--remote-debugging-port={port}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start chromium")?;
        walstream::local::wait_for_port(port, Duration::from_secs(30))?;
        Ok(Self {
            child,
            port,
            _profile: profile,
        })
    }

    /// Opens `url` in a new tab.
    pub async fn open(&self, url: &str) -> anyhow::Result<Page> {
        let body = tokio::time::timeout(Duration::from_secs(30), self.devtools_put(url))
            .await
            .context("Chromium did not answer for a new tab")??;
        let target: Value =
            serde_json::from_str(&body).with_context(|| format!("opening a tab: {body}"))?;
        let socket_url = target["webSocketDebuggerUrl"]
            .as_str()
            .context("the new tab has no webSocketDebuggerUrl")?;
        let (socket, _) = tokio_tungstenite::connect_async(socket_url)
            .await
            .with_context(|| format!("connecting to {socket_url}"))?;
        Ok(Page { socket, next_id: 0 })
    }
}

impl Browser {
    /// `PUT /json/new?{url}`: Chromium keeps the connection open, so the body is read by its
    /// Content-Length.
    async fn devtools_put(&self, url: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        // Chromium builds the tab's WebSocket address from the Host header.
        let request = format!(
            "PUT /json/new?{url} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).await?;
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = stream.read(&mut buffer).await?;
            anyhow::ensure!(read > 0, "Chromium closed the connection");
            received.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&received);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .context("no Content-Length from Chromium")?;
            if body.len() >= length {
                return Ok(body[..length].to_owned());
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    /// One DevTools command and its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket.send(Message::text(command.to_string())).await?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .with_context(|| format!("no answer to {method}"))?
                .context("the tab closed")??;
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text)?;
            if answer["id"] != id {
                continue;
            }
            if !answer["error"].is_null() {
                bail!("{method}: {}", answer["error"]);
            }
            return Ok(answer["result"].clone());
        }
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if !result["exceptionDetails"].is_null() {
            bail!("`{expression}` threw: {}", result["exceptionDetails"]);
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it is truthy, and returns its value.
    pub async fn wait_for(
        &mut self,
        expression: &str,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression).await?;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return Ok(value);
            }
            if Instant::now() > deadline {
                let text = self
                    .eval("document.body ? document.body.innerText.slice(0, 500) : ''")
                    .await?;
                bail!("timed out after {timeout:?} waiting for {what}; the page shows: {text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Types `text` into the focused element, as a keyboard's input would.
    pub async fn type_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.call("Input.insertText", json!({"text": text})).await?;
        Ok(())
    }
}
