//! The seeds' order choreography end to end: GraphQL → PostgreSQL → WAL → walstream → NATS →
//! the inventory, payment, shipping and monitor services (`order-services`, separate processes
//! with plain NATS and PostgreSQL clients) → PostgreSQL → WAL → …

mod harness;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

const EXAMPLE_SQL: &str = include_str!("../sql/example/schema.sql");
const SECRET: &str = "choreography-secret";
const SERVICES: [&str; 4] = ["inventory", "payment", "shipping", "monitor"];

/// One of the services, as a child process; killed when dropped.
struct Service {
    name: &'static str,
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Servers, walstream `run` with the choreography's config, and the four services.
struct Flow {
    cluster: Cluster,
    graphql_port: u16,
    services: Vec<Service>,
    _walstream: Walstream,
}

impl Flow {
    async fn start() -> anyhow::Result<Self> {
        let cluster = Cluster::start().await?;
        cluster.sql(EXAMPLE_SQL).await?;
        let graphql_port = walstream::local::free_port()?;
        let http_port = walstream::local::free_port()?;
        let config = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("integration/choreography/walstream.toml");
        let env = [
            ("DATABASE_URL", cluster.db_url()),
            ("NATS_URL", cluster.nats.url()),
            (
                "WALSTREAM_DATA",
                cluster.dir.path().join("checkpoint").display().to_string(),
            ),
            ("HTTP_LISTEN", format!("127.0.0.1:{http_port}")),
            ("GRAPHQL_LISTEN", format!("127.0.0.1:{graphql_port}")),
            ("JWT_SECRET", SECRET.to_owned()),
        ];
        let walstream = Walstream::start_with_env("run", &config, &cluster.log_path(), &env)?;
        wait_for_slot(&cluster).await?;
        walstream::local::wait_for_port(graphql_port, Duration::from_secs(30))
            .inspect_err(|_| dump_log(&cluster.log_path()))?;
        let mut flow = Self {
            cluster,
            graphql_port,
            services: Vec::new(),
            _walstream: walstream,
        };
        for name in SERVICES {
            flow.start_service(name)?;
        }
        Ok(flow)
    }

    fn start_service(&mut self, name: &'static str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.service_log(name))?;
        let token = sign_with(
            json!({"sub": "payment-service", "role": "order_service"}),
            SECRET,
            "choreography",
            3600,
        );
        let child = Command::new(env!("CARGO_BIN_EXE_order-services"))
            .arg(name)
            .args(["--nats", &self.cluster.nats.url()])
            .args(["--database", &self.cluster.db_url()])
            .args([
                "--graphql",
                &format!("http://127.0.0.1:{}/graphql", self.graphql_port),
            ])
            .args(["--token", &token])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.services.push(Service { name, child });
        Ok(())
    }

    fn pid_of(&self, name: &str) -> u32 {
        self.services
            .iter()
            .find(|service| service.name == name)
            .map_or(0, |service| service.child.id())
    }

    fn kill_service(&mut self, name: &str) {
        self.services.retain(|service| service.name != name);
    }

    fn service_log(&self, name: &str) -> PathBuf {
        self.cluster.dir.path().join(format!("{name}.log"))
    }

    fn dump_logs(&self) {
        dump_log(&self.cluster.log_path());
        for name in SERVICES {
            dump_log(&self.service_log(name));
        }
    }

    /// `placeOrder` as Alice (user 1); returns the order's id.
    async fn place_order(
        &self,
        identifier: &str,
        items: Value,
        card: &str,
    ) -> anyhow::Result<String> {
        let token = alice_token();
        let body = json!({
            "query": "mutation($i: PlaceOrderInput!) { placeOrder(input: $i) { id status } }",
            "variables": {"i": {"identifier": identifier, "items": items, "cardToken": card}},
        });
        let (status, response) = http_request(
            self.graphql_port,
            "POST",
            "/graphql",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Bearer {token}")),
            ],
            &body.to_string(),
        )
        .await?;
        let response: Value = serde_json::from_str(&response)?;
        anyhow::ensure!(
            status == 200 && response.get("errors").is_none(),
            "{response}"
        );
        Ok(response["data"]["placeOrder"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Waits until every order named has left `pending`/`paid`; returns their final statuses.
    async fn settle(
        &self,
        identifiers: &[String],
        within: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let client = self.cluster.client().await?;
        let deadline = Instant::now() + within;
        loop {
            let rows = client
                .query(
                    "SELECT status FROM tb_order WHERE identifier = ANY($1) ORDER BY identifier",
                    &[&identifiers],
                )
                .await?;
            let statuses: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let done = statuses.len() == identifiers.len()
                && statuses.iter().all(|s| s == "shipped" || s == "failed");
            if done {
                return Ok(statuses);
            }
            if Instant::now() > deadline {
                self.dump_logs();
                anyhow::bail!("orders not settled within {within:?}: {statuses:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn query_one_i64(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(self
            .cluster
            .client()
            .await?
            .query_one(sql, &[])
            .await?
            .get(0))
    }

    /// `(quantity, reserved)` of a product's stock.
    async fn stock(&self, product: &str) -> anyhow::Result<(i32, i32)> {
        let row = self
            .cluster
            .client()
            .await?
            .query_one(
                "SELECT v.quantity, v.reserved FROM tb_inventory v
                 JOIN tb_product p ON p.pk_product = v.fk_product WHERE p.identifier = $1",
                &[&product],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// The monitor's log for an order: its event types in order.
    async fn event_log(&self, identifier: &str) -> anyhow::Result<Vec<String>> {
        let rows = self
            .cluster
            .client()
            .await?
            .query(
                "SELECT l.event_type FROM tb_event_log l
                 JOIN tb_order o ON o.pk_order = l.fk_order
                 WHERE o.identifier = $1 ORDER BY l.pk_event_log",
                &[&identifier],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// A token for the example's user 1 (alice), as an app would hold it.
fn alice_token() -> String {
    sign_with(
        json!({"sub": "alice", "role": "app_user", "user_pk": 1}),
        SECRET,
        "choreography",
        600,
    )
}

/// Whether `wanted` appears in `seen` in this order (other entries may come between).
fn in_order(seen: &[String], wanted: &[&str]) -> bool {
    let mut rest = seen.iter();
    wanted.iter().all(|w| rest.any(|s| s == w))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_travels_to_shipped_and_the_subscription_sees_each_status() -> anyhow::Result<()> {
    let flow = Flow::start().await?;
    let alice = alice_token();
    let mut subscriber = Subscriber::connect(flow.graphql_port, &alice, false).await?;
    subscriber
        .subscribe("subscription { orderChanged { identifier status } }")
        .await?;

    let started = Instant::now();
    flow.place_order(
        "ord-happy",
        json!([{"product": "widget", "quantity": 2}]),
        "tok_visa",
    )
    .await?;
    let statuses = flow
        .settle(&["ord-happy".to_owned()], Duration::from_secs(20))
        .await?;
    println!("ord-happy reached {statuses:?} in {:?}", started.elapsed());
    assert_eq!(statuses, ["shipped"]);

    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("shipped") {
        let event = subscriber.next_event().await?;
        seen.push(
            event["data"]["orderChanged"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(seen, ["pending", "paid", "shipped"]);

    let log = flow.event_log("ord-happy").await?;
    assert!(
        in_order(
            &log,
            &[
                "events.order.created",
                "events.inventory.reserved",
                "events.payment.charged",
                "events.shipping.created"
            ]
        ),
        "{log:?}"
    );
    assert_eq!(flow.stock("widget").await?, (98, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declined_payment_is_compensated_short_stock_never_charged_and_poison_dead_lettered(
) -> anyhow::Result<()> {
    let flow = Flow::start().await?;
    flow.place_order(
        "ord-declined",
        json!([{"product": "gadget", "quantity": 3}]),
        "tok_declined",
    )
    .await?;
    flow.place_order(
        "ord-short",
        json!([{"product": "widget", "quantity": 1000}]),
        "tok_visa",
    )
    .await?;
    let statuses = flow
        .settle(
            &["ord-declined".to_owned(), "ord-short".to_owned()],
            Duration::from_secs(20),
        )
        .await?;
    assert_eq!(statuses, ["failed", "failed"]);
    // The reservation was released: the stock is back where it was.
    assert_eq!(flow.stock("gadget").await?, (100, 0));
    assert_eq!(flow.stock("widget").await?, (100, 0));
    let declined = flow
        .query_one_i64(
            "SELECT count(*) FROM tb_payment p JOIN tb_order o ON o.pk_order = p.fk_order
             WHERE o.identifier = 'ord-declined' AND p.status = 'declined'",
        )
        .await?;
    assert_eq!(declined, 1);
    let short_charges = flow
        .query_one_i64(
            "SELECT count(*) FROM tb_provider_charge c JOIN tb_order o
             ON c.idempotency_key = 'order-' || o.pk_order WHERE o.identifier = 'ord-short'",
        )
        .await?;
    assert_eq!(short_charges, 0, "an order out of stock is never charged");
    // A message that keeps failing (here a constraint the shipping service cannot get past)
    // goes to the dead-letter table after max_deliver attempts; the flow goes on.
    flow.cluster
        .sql(
            "CREATE FUNCTION fn_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF (SELECT identifier FROM tb_order WHERE pk_order = NEW.fk_order) = 'ord-poison'
                 THEN RAISE EXCEPTION 'no carrier for this address'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_poison BEFORE INSERT ON tb_shipping
                 FOR EACH ROW EXECUTE FUNCTION fn_refuse_poison();",
        )
        .await?;
    flow.place_order(
        "ord-poison",
        json!([{"product": "widget", "quantity": 1}]),
        "tok_visa",
    )
    .await?;
    let client = flow.cluster.client().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead: Vec<(String, String)> = loop {
        let rows = client
            .query("SELECT service, error FROM tb_dead_letter", &[])
            .await?;
        if !rows.is_empty() {
            break rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing dead-lettered within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "shipping");
    assert!(dead[0].1.contains("no carrier"), "{dead:?}");
    flow.place_order(
        "ord-later",
        json!([{"product": "widget", "quantity": 1}]),
        "tok_visa",
    )
    .await?;
    let statuses = flow
        .settle(&["ord-later".to_owned()], Duration::from_secs(20))
        .await?;
    assert_eq!(statuses, ["shipped"], "the flow goes on past a dead letter");

    let log = flow.event_log("ord-declined").await?;
    assert!(
        in_order(
            &log,
            &[
                "events.order.created",
                "events.inventory.reserved",
                "events.payment.charged",
                "events.order.failed"
            ]
        ),
        "{log:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_orders_with_the_payment_service_killed_midway_add_up_exactly(
) -> anyhow::Result<()> {
    let mut flow = Flow::start().await?;
    flow.cluster
        .sql("UPDATE tb_inventory SET quantity = 10000")
        .await?;
    let identifiers: Vec<String> = (0..200).map(|i| format!("ord-{i:03}")).collect();
    let mut placing = Vec::new();
    for batch in identifiers.chunks(20) {
        let batch = batch.to_vec();
        let flow_ref = &flow;
        placing.push(async move {
            for (n, identifier) in batch.iter().enumerate() {
                let product = if n % 2 == 0 { "widget" } else { "gadget" };
                let items = json!([{"product": product, "quantity": 1 + n % 3}]);
                flow_ref.place_order(identifier, items, "tok_visa").await?;
            }
            anyhow::Ok(())
        });
    }
    let placed = futures::future::try_join_all(placing);
    let payment_pid = flow.pid_of("payment");
    let kill = async {
        // Mid-flow: orders are still being placed and paid.
        tokio::time::sleep(Duration::from_millis(800)).await;
        // SAFETY: kill(2) on a child process this test started.
        unsafe {
            libc::kill(payment_pid as i32, libc::SIGKILL);
        }
    };
    let (placed, ()) = tokio::join!(placed, kill);
    placed?;
    let paid_before_restart = flow
        .query_one_i64("SELECT count(*) FROM tb_payment")
        .await?;
    println!("{paid_before_restart} of 200 orders paid when the payment service was restarted");
    flow.kill_service("payment");
    tokio::time::sleep(Duration::from_secs(1)).await;
    flow.start_service("payment")?;

    let statuses = flow.settle(&identifiers, Duration::from_secs(90)).await?;
    assert!(statuses.iter().all(|s| s == "shipped"), "{statuses:?}");
    let count = |sql: &'static str| flow.query_one_i64(sql);
    assert_eq!(count("SELECT count(*) FROM tb_provider_charge").await?, 200);
    assert_eq!(
        count("SELECT count(*) FROM tb_payment WHERE status = 'succeeded'").await?,
        200
    );
    assert_eq!(count("SELECT count(*) FROM tb_shipping").await?, 200);
    assert_eq!(
        count(
            "SELECT count(*) FROM tb_order o JOIN tb_payment p ON p.fk_order = o.pk_order
             WHERE p.amount <> o.total"
        )
        .await?,
        0,
        "every payment is its order's total"
    );
    for product in ["widget", "gadget"] {
        let ordered = flow
            .cluster
            .client()
            .await?
            .query_one(
                "SELECT coalesce(sum(i.quantity), 0)::int FROM tb_order_item i
                 JOIN tb_product p ON p.pk_product = i.fk_product WHERE p.identifier = $1",
                &[&product],
            )
            .await?
            .get::<_, i32>(0);
        assert_eq!(
            flow.stock(product).await?,
            (10000 - ordered, 0),
            "{product}"
        );
    }
    assert_eq!(count("SELECT count(*) FROM tb_dead_letter").await?, 0);
    assert_eq!(
        count(
            "SELECT count(*) FROM (SELECT fk_order FROM tb_event_log
             WHERE event_type = 'events.shipping.created'
             GROUP BY fk_order HAVING count(*) = 1) once"
        )
        .await?,
        200,
        "the monitor logged each shipment once"
    );
    Ok(())
}
