//! The order choreography's services: inventory, payment, shipping and monitor.
//!
//! External programs, as a user would write them: a plain NATS client, a plain PostgreSQL client
//! and an HTTP call to walstream's GraphQL endpoint, nothing of walstream's code. Each service
//! reads a durable JetStream consumer, handles a message in one database transaction and
//! acknowledges it only after the commit. Handlers are idempotent (a redelivered message changes
//! nothing twice), and a message that still fails after `MAX_DELIVER` attempts is recorded in
//! `tb_dead_letter` and acknowledged. No service publishes to NATS: its rows are its events,
//! carried by walstream from the WAL (the routes in `integration/choreography/walstream.toml`).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls, Transaction};

const MAX_DELIVER: i64 = 5;

#[derive(Parser)]
#[command(about = "The order choreography's services (walstream's example)")]
struct Args {
    /// Which service to run; `all` runs the four in one process.
    service: Service,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, env = "DATABASE_URL")]
    database: String,
    /// walstream's GraphQL endpoint (payment marks orders paid through it).
    #[arg(
        long,
        env = "GRAPHQL_URL",
        default_value = "http://127.0.0.1:8080/graphql"
    )]
    graphql: String,
    /// A token for the `order_service` role (payment only)...
    #[arg(long, env = "ORDER_SERVICE_TOKEN", default_value = "")]
    token: String,
    /// ...or the HS256 secret walstream checks tokens with, to sign one.
    #[arg(long, env = "JWT_SECRET", default_value = "")]
    jwt_secret: String,
    #[arg(long, default_value = "fraiseql_events")]
    stream: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Service {
    Inventory,
    Payment,
    Shipping,
    Monitor,
    All,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Inventory => "inventory",
            Service::Payment => "payment",
            Service::Shipping => "shipping",
            Service::Monitor => "monitor",
            Service::All => "all",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Service::Inventory => "events.order.created",
            Service::Payment => "events.inventory.reserved",
            Service::Shipping => "events.order.status_updated",
            Service::Monitor | Service::All => "events.>",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut args = Args::parse();
    if args.token.is_empty() && !args.jwt_secret.is_empty() {
        args.token = service_token(&args.jwt_secret)?;
    }
    let services = match args.service {
        Service::All => vec![
            Service::Inventory,
            Service::Payment,
            Service::Shipping,
            Service::Monitor,
        ],
        one => vec![one],
    };
    let mut running = Vec::new();
    for service in services {
        let args = Args {
            service,
            nats: args.nats.clone(),
            database: args.database.clone(),
            graphql: args.graphql.clone(),
            token: args.token.clone(),
            jwt_secret: String::new(),
            stream: args.stream.clone(),
        };
        running.push(tokio::spawn(async move {
            run(&args)
                .await
                .with_context(|| format!("the {} service", args.service.name()))
        }));
    }
    for service in running {
        service.await??;
    }
    Ok(())
}

/// A day's token for the `order_service` role.
fn service_token(secret: &str) -> anyhow::Result<String> {
    let claims = json!({
        "sub": "order-services",
        "role": "order_service",
        "exp": jsonwebtoken::get_current_timestamp() + 24 * 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing the service token")
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let (mut db, connection) = tokio_postgres::connect(&args.database, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    let nats = async_nats::connect(&args.nats)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(nats);
    let stream = loop {
        // walstream creates the stream when it first starts.
        match js.get_stream(&args.stream).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let name = args.service.name();
    let consumer = stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject: args.service.subject().to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(10),
                max_deliver: MAX_DELIVER,
                ..Default::default()
            },
        )
        .await
        .context("creating the durable consumer")?;
    tracing::info!(
        service = name,
        subject = args.service.subject(),
        "consuming"
    );
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("reading the consumer: {e}"))?;
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("message metadata: {e}"))?;
        let (delivered, sequence) = (info.delivered, info.stream_sequence);
        let message_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| format!("seq-{sequence}"));
        let subject = message.subject.to_string();
        let event: Result<Value, _> = serde_json::from_slice(&message.payload);
        let outcome = match &event {
            Ok(event) => handle(args, &mut db, event, &subject, &message_id).await,
            Err(error) => Err(anyhow::anyhow!("not JSON: {error}")),
        };
        match outcome {
            Ok(()) => {}
            Err(error) if delivered >= MAX_DELIVER => {
                tracing::error!(
                    service = name,
                    sequence,
                    "giving up after {delivered} attempts: {error:#}"
                );
                let data = event.ok().map(|e| e.to_string());
                db.execute(
                    "INSERT INTO tb_dead_letter (service, subject, stream_sequence, data, error)
                     VALUES ($1, $2, $3, $4::text::jsonb, $5) ON CONFLICT DO NOTHING",
                    &[
                        &name,
                        &subject,
                        &(sequence as i64),
                        &data,
                        &format!("{error:#}"),
                    ],
                )
                .await?;
            }
            Err(error) => {
                tracing::warn!(service = name, sequence, delivered, "will retry: {error:#}");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
                    .map_err(|e| anyhow::anyhow!("nak: {e}"))?;
                continue;
            }
        }
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    Ok(())
}

async fn handle(
    args: &Args,
    db: &mut Client,
    event: &Value,
    subject: &str,
    message_id: &str,
) -> anyhow::Result<()> {
    match args.service {
        Service::Inventory => reserve_stock(db, order_of(event)?).await,
        Service::Payment => charge(db, args, order_of(event)?).await,
        Service::Shipping if event["data"]["status"] == "paid" => ship(db, order_of(event)?).await,
        Service::Shipping => Ok(()),
        Service::Monitor | Service::All => record(db, event, subject, message_id).await,
    }
}

/// The order an event is about: `pk_order` of an order row, `fk_order` of the others.
fn order_of(event: &Value) -> anyhow::Result<i64> {
    let data = &event["data"];
    data["pk_order"]
        .as_i64()
        .or_else(|| data["fk_order"].as_i64())
        .with_context(|| format!("no order in event {event}"))
}

/// Locks the order. Not finding it is an error to retry, not a message to drop: PostgreSQL
/// hands a commit to logical decoding once it is in the WAL, a moment before other sessions
/// see it, so an event can arrive before its row is visible.
async fn lock_order(tx: &Transaction<'_>, order: i64) -> anyhow::Result<OrderRow> {
    let row = tx
        .query_opt(
            "SELECT id::text, status, total::text, card_token FROM tb_order
             WHERE pk_order = $1 FOR UPDATE",
            &[&order],
        )
        .await?;
    let row = row.with_context(|| format!("order {order} is not visible (yet)"))?;
    Ok(OrderRow {
        id: row.get(0),
        status: row.get(1),
        total: row.get(2),
        card_token: row.get(3),
    })
}

struct OrderRow {
    id: String,
    status: String,
    total: String,
    card_token: Option<String>,
}

/// Inventory: reserve every item's quantity, or fail the order when stock is short.
async fn reserve_stock(db: &mut Client, order: i64) -> anyhow::Result<()> {
    let tx = db.transaction().await?;
    lock_order(&tx, order).await?;
    let answered = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM tb_reservation WHERE fk_order = $1)
                 OR EXISTS (SELECT 1 FROM tb_order_failure WHERE fk_order = $1)",
            &[&order],
        )
        .await?;
    if answered.get::<_, bool>(0) {
        return Ok(tx.commit().await?);
    }
    // Locked in product order, so concurrent reservations cannot deadlock.
    tx.execute(
        "SELECT 1 FROM tb_inventory
         WHERE fk_product IN (SELECT fk_product FROM tb_order_item WHERE fk_order = $1)
         ORDER BY fk_product FOR UPDATE",
        &[&order],
    )
    .await?;
    let short: Vec<String> = tx
        .query(
            "SELECT p.identifier
             FROM tb_order_item i
             JOIN tb_product p ON p.pk_product = i.fk_product
             LEFT JOIN tb_inventory v ON v.fk_product = i.fk_product
             WHERE i.fk_order = $1 AND coalesce(v.quantity - v.reserved, 0) < i.quantity
             ORDER BY i.fk_product",
            &[&order],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if short.is_empty() {
        tx.execute(
            "UPDATE tb_inventory v SET reserved = v.reserved + i.quantity
             FROM tb_order_item i WHERE i.fk_order = $1 AND v.fk_product = i.fk_product",
            &[&order],
        )
        .await?;
        tx.execute(
            "INSERT INTO tb_reservation (fk_order) VALUES ($1)",
            &[&order],
        )
        .await?;
    } else {
        let reason = format!("out of stock: {}", short.join(", "));
        fail_order(&tx, order, &reason).await?;
    }
    Ok(tx.commit().await?)
}

async fn fail_order(tx: &Transaction<'_>, order: i64, reason: &str) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO tb_order_failure (fk_order, reason) VALUES ($1, $2)",
        &[&order, &reason],
    )
    .await?;
    tx.execute(
        "UPDATE tb_order SET status = 'failed' WHERE pk_order = $1",
        &[&order],
    )
    .await?;
    Ok(())
}

/// Payment: charge through the provider (idempotent by order), record the payment, and either
/// mark the order paid through GraphQL or compensate: release the stock and fail the order.
async fn charge(db: &mut Client, args: &Args, order: i64) -> anyhow::Result<()> {
    let tx = db.transaction().await?;
    let row = lock_order(&tx, order).await?;
    let recorded: Option<String> = tx
        .query_opt(
            "SELECT status FROM tb_payment WHERE fk_order = $1",
            &[&order],
        )
        .await?
        .map(|r| r.get(0));
    let succeeded = match recorded {
        Some(status) => status == "succeeded",
        None => {
            let approved: bool = tx
                .query_one(
                    "SELECT fn_provider_charge($1, $2, $3::text::numeric)",
                    &[&format!("order-{order}"), &row.card_token, &row.total],
                )
                .await?
                .get(0);
            let status = if approved { "succeeded" } else { "declined" };
            tx.execute(
                "INSERT INTO tb_payment (fk_order, amount, status)
                 VALUES ($1, $2::text::numeric, $3)",
                &[&order, &row.total, &status],
            )
            .await?;
            if !approved {
                release_stock(&tx, order).await?;
                fail_order(&tx, order, "payment declined").await?;
            }
            approved
        }
    };
    tx.commit().await?;
    if succeeded && row.status == "pending" {
        mark_paid(args, &row.id).await?;
    }
    Ok(())
}

/// The compensation: give the order's reserved stock back.
async fn release_stock(tx: &Transaction<'_>, order: i64) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE tb_inventory v SET reserved = v.reserved - i.quantity
         FROM tb_order_item i WHERE i.fk_order = $1 AND v.fk_product = i.fk_product",
        &[&order],
    )
    .await?;
    tx.execute(
        "UPDATE tb_reservation SET status = 'released' WHERE fk_order = $1",
        &[&order],
    )
    .await?;
    Ok(())
}

async fn mark_paid(args: &Args, order_id: &str) -> anyhow::Result<()> {
    let response = graphql(
        &args.graphql,
        &args.token,
        "mutation($id: ID!) { updateOrderStatus(orderId: $id, status: \"paid\") { id status } }",
        json!({ "id": order_id }),
    )
    .await?;
    anyhow::ensure!(
        response.get("errors").is_none(),
        "updateOrderStatus: {response}"
    );
    Ok(())
}

/// Shipping: a label and a tracking number, the reserved stock taken out, the order shipped.
async fn ship(db: &mut Client, order: i64) -> anyhow::Result<()> {
    let tx = db.transaction().await?;
    let row = lock_order(&tx, order).await?;
    if row.status != "paid" {
        return Ok(tx.commit().await?);
    }
    tx.execute(
        "INSERT INTO tb_shipping (fk_order, tracking_number, label_url)
         VALUES ($1::bigint, 'TRK' || lpad($1::bigint::text, 10, '0'),
                 'https://labels.example.com/' || $1::bigint::text || '.pdf')",
        &[&order],
    )
    .await?;
    tx.execute(
        "UPDATE tb_inventory v SET quantity = v.quantity - i.quantity,
                                   reserved = v.reserved - i.quantity
         FROM tb_order_item i WHERE i.fk_order = $1 AND v.fk_product = i.fk_product",
        &[&order],
    )
    .await?;
    tx.execute(
        "UPDATE tb_reservation SET status = 'consumed' WHERE fk_order = $1",
        &[&order],
    )
    .await?;
    tx.execute(
        "UPDATE tb_order SET status = 'shipped' WHERE pk_order = $1",
        &[&order],
    )
    .await?;
    Ok(tx.commit().await?)
}

/// Monitor: every event into tb_event_log, once (keyed by its message id).
async fn record(
    db: &mut Client,
    event: &Value,
    subject: &str,
    message_id: &str,
) -> anyhow::Result<()> {
    let order = order_of(event).ok();
    db.execute(
        "INSERT INTO tb_event_log (identifier, event_type, fk_order, data)
         VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT (identifier) DO NOTHING",
        &[&message_id, &subject, &order, &event["data"].to_string()],
    )
    .await?;
    Ok(())
}

/// POSTs a GraphQL request over plain HTTP/1.1 and returns the JSON response.
async fn graphql(url: &str, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let body = json!({ "query": query, "variables": variables }).to_string();
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .context("connecting to GraphQL timed out")??;
    socket.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut response))
        .await
        .context("GraphQL did not answer within 10 s")??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GraphQL answered {head}");
    Ok(serde_json::from_str(body)?)
}
