//! The GraphQL front end against a real PostgreSQL and NATS, with the example schema:
//! queries, mutations, auth, row-level security, subscriptions and limits.

mod harness;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use harness::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const EXAMPLE_SQL: &str = include_str!("../sql/example/schema.sql");
const SECRET: &str = "test-secret";
const ISSUER: &str = "walstream-tests";

fn example_schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/example/schema.graphql")
}

/// A signed token for `user_pk`, running as `app_user` (row-level security applies).
fn token_for(user_pk: i64) -> String {
    sign(
        json!({"sub": format!("user-{user_pk}"), "role": "app_user", "user_pk": user_pk}),
        SECRET,
        600,
    )
}

fn sign(claims: Value, secret: &str, expires_in: i64) -> String {
    sign_with(claims, secret, ISSUER, expires_in)
}

struct Api {
    cluster: Cluster,
    port: u16,
    _processes: Vec<Walstream>,
}

/// The example schema loaded, a second user added, and walstream started as `commands`
/// (`run`, or `stream` + `serve`), with `graphql_extra` appended to `[graphql]`.
async fn start(commands: &[&str], graphql_extra: &str) -> anyhow::Result<Api> {
    start_extended(commands, graphql_extra, "", None).await
}

/// As `start`, with `sql` run after the example's and, when given, `schema` (SDL text) in
/// place of the example schema.
async fn start_extended(
    commands: &[&str],
    graphql_extra: &str,
    sql: &str,
    schema: Option<String>,
) -> anyhow::Result<Api> {
    let cluster = Cluster::start().await?;
    cluster.sql(EXAMPLE_SQL).await?;
    cluster
        .sql("INSERT INTO tb_user (identifier, email, name) VALUES ('bob', 'bob@example.com', 'Bob')")
        .await?;
    if !sql.is_empty() {
        cluster.sql(sql).await?;
    }
    let schema_path = match schema {
        Some(text) => {
            let path = cluster.dir.path().join("schema.graphql");
            std::fs::write(&path, text)?;
            path
        }
        None => example_schema(),
    };
    let port = walstream::local::free_port()?;
    let extra = format!(
        "[graphql]\nschema = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n{graphql_extra}\n\
         [graphql.auth]\nhs256_secret = \"{SECRET}\"\nissuer = \"{ISSUER}\"\n",
        schema_path.display()
    );
    let config = cluster.config(&["public.tb_order"], &extra)?;
    let mut processes = Vec::new();
    for command in commands {
        let log = cluster.dir.path().join(format!("walstream-{command}.log"));
        processes.push(Walstream::start_command(command, &config, &log)?);
    }
    if commands.iter().any(|c| *c != "serve") {
        wait_for_slot(&cluster).await?;
    }
    walstream::local::wait_for_port(port, Duration::from_secs(30)).inspect_err(|_| {
        for command in commands {
            dump_log(&cluster.dir.path().join(format!("walstream-{command}.log")));
        }
    })?;
    Ok(Api {
        cluster,
        port,
        _processes: processes,
    })
}

impl Api {
    /// POSTs a GraphQL request; returns the HTTP status and the response body.
    async fn post(&self, token: Option<&str>, body: &Value) -> (u16, Value) {
        let authorization = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(value) = &authorization {
            headers.push(("Authorization", value.as_str()));
        }
        let (status, text) =
            http_request(self.port, "POST", "/graphql", &headers, &body.to_string())
                .await
                .expect("HTTP request");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Runs a query as `user_pk` and returns the whole response (`data` and `errors`).
    async fn gql(&self, user_pk: i64, query: &str, variables: Value) -> Value {
        let (status, body) = self
            .post(
                Some(&token_for(user_pk)),
                &json!({"query": query, "variables": variables}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn create_order(&self, user_pk: i64, identifier: &str, total: &str) -> String {
        let response = self
            .gql(
                user_pk,
                "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status total } }",
                json!({"i": {"identifier": identifier, "total": total}}),
            )
            .await;
        assert!(response.get("errors").is_none(), "{response}");
        response["data"]["createOrder"]["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }
}

fn error_code(response: &Value) -> &str {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_filter_order_and_page_and_mutations_report_outcomes() -> anyhow::Result<()> {
    let api = start(&["serve"], "").await?;
    // Mutation success: fn_create_order returns no entity; it is re-read from v_order.
    let (status, created) = api
        .post(
            Some(&token_for(1)),
            &json!({"query": "mutation { createOrder(input: {identifier: \"ord-001\", total: \"49.99\"}) { id identifier status total createdAt } }"}),
        )
        .await;
    assert_eq!(status, 200);
    let order = &created["data"]["createOrder"];
    assert_eq!(order["status"], "pending", "{created}");
    assert_eq!(order["total"], "49.99", "Decimal is an exact string");
    assert!(order["createdAt"].as_str().is_some_and(|t| t.contains('T')));
    let first_id = order["id"].as_str().expect("id").to_owned();
    for (identifier, total) in [
        ("ord-002", "10.00"),
        ("ord-003", "120.50"),
        ("ord-004", "75.25"),
    ] {
        api.create_order(1, identifier, total).await;
    }

    // One row by id, only the fields asked for.
    let one = api
        .gql(
            1,
            "query($id: ID!) { order(id: $id) { identifier } }",
            json!({"id": first_id}),
        )
        .await;
    assert_eq!(one["data"]["order"], json!({"identifier": "ord-001"}));

    // Filters, ordering and paging.
    let filtered = api
        .gql(
            1,
            "{ orders(where: {total: {gte: \"50\"}, _or: [{identifier: {like: \"ord-00%\"}}]}, orderBy: [{total: DESC}]) { identifier total } }",
            json!({}),
        )
        .await;
    assert_eq!(
        filtered["data"]["orders"],
        json!([{"identifier": "ord-003", "total": "120.50"}, {"identifier": "ord-004", "total": "75.25"}]),
        "{filtered}"
    );
    let page = api
        .gql(
            1,
            "{ orders(orderBy: [{identifier: ASC}], limit: 2, offset: 1) { identifier } }",
            json!({}),
        )
        .await;
    assert_eq!(
        page["data"]["orders"],
        json!([{"identifier": "ord-002"}, {"identifier": "ord-003"}])
    );
    let set = api
        .gql(
            1,
            "{ orders(where: {identifier: {in: [\"ord-001\", \"ord-004\"]}, _not: {status: {eq: \"shipped\"}}}, orderBy: [{identifier: DESC}]) { identifier } }",
            json!({}),
        )
        .await;
    assert_eq!(
        set["data"]["orders"],
        json!([{"identifier": "ord-004"}, {"identifier": "ord-001"}])
    );

    // Injection attempts in every argument are data, never SQL.
    let hostile = "x' OR '1'='1'); DROP TABLE tb_order; --";
    let by_id = api
        .gql(
            1,
            "query($id: ID!) { order(id: $id) { id } }",
            json!({"id": hostile}),
        )
        .await;
    assert_eq!(error_code(&by_id), "BAD_USER_INPUT", "{by_id}");
    let message = by_id["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("SELECT") && !message.contains("v_order"),
        "SQL leaked: {message}"
    );
    let in_filter = api
        .gql(
            1,
            "query($s: String!) { orders(where: {status: {eq: $s, like: $s, in: [$s]}}) { id } }",
            json!({"s": hostile}),
        )
        .await;
    assert_eq!(in_filter["data"]["orders"], json!([]), "{in_filter}");
    let in_order_by = api
        .gql(1, "{ orders(orderBy: [{nope: ASC}]) { id } }", json!({}))
        .await;
    assert!(
        in_order_by["errors"][0]["message"].as_str().is_some(),
        "{in_order_by}"
    );
    let in_paging = api
        .gql(1, "{ orders(limit: 100000) { id } }", json!({}))
        .await;
    assert_eq!(error_code(&in_paging), "BAD_USER_INPUT");
    let via_mutation = api
        .gql(
            1,
            "mutation($i: CreateOrderInput!) { createOrder(input: $i) { identifier } }",
            json!({"i": {"identifier": hostile, "total": "1"}}),
        )
        .await;
    assert_eq!(via_mutation["data"]["createOrder"]["identifier"], hostile);
    let count = api
        .cluster
        .client()
        .await?
        .query_one("SELECT count(*) FROM tb_order", &[])
        .await?;
    assert_eq!(
        count.get::<_, i64>(0),
        5,
        "the table is intact and holds exactly the orders made"
    );

    // Input of the wrong type is a validation error before any SQL runs.
    let wrong_type = api
        .gql(
            1,
            "mutation { createOrder(input: {identifier: \"x\", total: \"abc\"}) { id } }",
            json!({}),
        )
        .await;
    assert!(
        wrong_type["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("total")),
        "{wrong_type}"
    );
    assert!(wrong_type["data"].is_null());
    let missing_field = api.gql(1, "{ orders { id password } }", json!({})).await;
    assert!(
        missing_field["errors"][0]["message"].as_str().is_some(),
        "{missing_field}"
    );

    // not_found:* and failed:* become errors carrying code, status and message.
    let missing = api
        .gql(
            1,
            "mutation($id: ID!) { updateOrderStatus(orderId: $id, status: \"paid\") { id } }",
            json!({"id": "00000000-0000-0000-0000-000000000000"}),
        )
        .await;
    let extensions = &missing["errors"][0]["extensions"];
    assert_eq!(extensions["code"], "NOT_FOUND", "{missing}");
    assert_eq!(extensions["status"], "not_found:order");
    assert_eq!(missing["errors"][0]["message"], "no order with this id");
    api.cluster
        .sql(&format!(
            "UPDATE tb_order SET status = 'shipped' WHERE id = '{first_id}'"
        ))
        .await?;
    let shipped = api
        .gql(
            1,
            "mutation($id: ID!) { cancelOrder(orderId: $id) { status } }",
            json!({"id": first_id}),
        )
        .await;
    assert_eq!(
        shipped["errors"][0]["extensions"]["code"], "FAILED",
        "{shipped}"
    );
    assert_eq!(
        shipped["errors"][0]["extensions"]["status"],
        "failed:already_shipped"
    );
    let second = api
        .gql(
            1,
            "{ orders(where: {identifier: {eq: \"ord-002\"}}) { id } }",
            json!({}),
        )
        .await;
    let second_id = second["data"]["orders"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cancelled = api
        .gql(
            1,
            "mutation($id: ID!) { cancelOrder(orderId: $id) { status } }",
            json!({"id": second_id}),
        )
        .await;
    assert_eq!(
        cancelled["data"]["cancelOrder"]["status"], "cancelled",
        "{cancelled}"
    );
    let again = api
        .gql(
            1,
            "mutation($id: ID!) { cancelOrder(orderId: $id) { status } }",
            json!({"id": second_id}),
        )
        .await;
    assert_eq!(
        again["data"]["cancelOrder"]["status"], "cancelled",
        "noop:* is a success: {again}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fraiseql_2_responses_nested_types_and_statement_timeout() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(EXAMPLE_SQL).await?;
    cluster
        .sql(
            "CREATE TYPE mutation_result AS (succeeded boolean, state_changed boolean, error_class text,
                status_detail text, http_status smallint, message text, entity_id uuid, entity_type text,
                entity jsonb, updated_fields text[], cascade jsonb, error_detail jsonb, metadata jsonb);
             CREATE FUNCTION fn_rename_order(p_order_id uuid, p_identifier text) RETURNS mutation_result
             LANGUAGE plpgsql AS $$
             DECLARE r mutation_result;
             BEGIN
                 IF EXISTS (SELECT 1 FROM tb_order WHERE identifier = p_identifier) THEN
                     r.succeeded := false; r.state_changed := false; r.error_class := 'conflict';
                     r.status_detail := 'duplicate_identifier'; r.message := 'identifier taken';
                     r.error_detail := jsonb_build_object('field', 'identifier');
                     RETURN r;
                 END IF;
                 UPDATE tb_order SET identifier = p_identifier WHERE id = p_order_id;
                 r.succeeded := true; r.state_changed := true; r.entity_id := p_order_id;
                 r.entity := (SELECT data FROM v_order WHERE id = p_order_id);
                 RETURN r;
             END $$;
             INSERT INTO tb_order (identifier, fk_user, total) VALUES ('a', 1, 1), ('b', 1, 2);
             CREATE VIEW v_order_detail AS
             SELECT o.id, jsonb_build_object(
                 'identifier', o.identifier,
                 'customer', jsonb_build_object('name', u.name, 'email', u.email),
                 'lines', jsonb_build_array(jsonb_build_object('sku', 'W-1', 'qty', 2),
                                            jsonb_build_object('sku', 'G-7', 'qty', 1))) AS data
             FROM tb_order o JOIN tb_user u ON u.pk_user = o.fk_user;
             GRANT SELECT ON v_order_detail TO app_user;
             CREATE FUNCTION fn_slow(p_seconds float8) RETURNS mutation_response
             LANGUAGE plpgsql AS $$
             DECLARE r mutation_response;
             BEGIN PERFORM pg_sleep(p_seconds); r.status := 'success'; RETURN r; END $$;",
        )
        .await?;
    let schema = cluster.dir.path().join("schema.graphql");
    std::fs::write(
        &schema,
        std::fs::read_to_string(example_schema())?.replace(
            "type Mutation {",
            "type Mutation {\n  renameOrder(orderId: ID!, identifier: String!): Order @function(name: \"fn_rename_order\")\n  \
             slow(seconds: Float!): Order @function(name: \"fn_slow\")",
        )
        .replace(
            "type Query {",
            "type Customer { name: String! email: String! }\ntype Line { sku: String! qty: Int! }\n\
             type OrderDetail @view(name: \"v_order_detail\") { identifier: String! customer: Customer! lines: [Line!]! }\n\
             type Query {\n  orderDetails(where: OrderDetailWhere): [OrderDetail!]!",
        ),
    )?;
    let port = walstream::local::free_port()?;
    let config = cluster.config(
        &["public.tb_order"],
        &format!(
            "[graphql]\nschema = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nstatement_timeout_ms = 500\n\
             [graphql.auth]\nhs256_secret = \"{SECRET}\"\n",
            schema.display()
        ),
    )?;
    let _serve = Walstream::start_command("serve", &config, &cluster.log_path())?;
    walstream::local::wait_for_port(port, Duration::from_secs(30))
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let api = Api {
        cluster,
        port,
        _processes: Vec::new(),
    };
    let id: String = api
        .cluster
        .client()
        .await?
        .query_one("SELECT id::text FROM tb_order WHERE identifier = 'a'", &[])
        .await?
        .get(0);
    let query = "mutation($id: ID!, $name: String!) { renameOrder(orderId: $id, identifier: $name) { identifier } }";
    let renamed = api.gql(1, query, json!({"id": id, "name": "c"})).await;
    assert_eq!(
        renamed["data"]["renameOrder"]["identifier"], "c",
        "{renamed}"
    );
    let conflict = api.gql(1, query, json!({"id": id, "name": "b"})).await;
    let extensions = &conflict["errors"][0]["extensions"];
    assert_eq!(extensions["code"], "CONFLICT", "{conflict}");
    assert_eq!(extensions["status"], "conflict:duplicate_identifier");
    assert_eq!(extensions["detail"], json!({"field": "identifier"}));

    // Types embedded in `data` resolve from it, without queries of their own.
    let nested = api
        .gql(1, "{ orderDetails(where: {identifier: {eq: \"b\"}}) { identifier customer { name } lines { sku qty } } }", json!({}))
        .await;
    assert_eq!(
        nested["data"]["orderDetails"],
        json!([{"identifier": "b", "customer": {"name": "Alice"}, "lines": [{"sku": "W-1", "qty": 2}, {"sku": "G-7", "qty": 1}]}]),
        "{nested}"
    );

    // A statement over graphql.statement_timeout_ms is cancelled and reported as such.
    let slow = api
        .gql(1, "mutation { slow(seconds: 3) { id } }", json!({}))
        .await;
    assert_eq!(error_code(&slow), "TIMEOUT", "{slow}");
    let quick = api
        .gql(1, "mutation { slow(seconds: 0.01) { id } }", json!({}))
        .await;
    assert!(quick.get("errors").is_none(), "{quick}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_verified_and_introspection_can_be_off() -> anyhow::Result<()> {
    let api = start(&["serve"], "introspection = false").await?;
    let body = json!({"query": "{ orders { id } }"});
    let cases = [
        ("no token", None),
        (
            "bad signature",
            Some(sign(
                json!({"role": "app_user", "user_pk": 1}),
                "wrong-secret",
                600,
            )),
        ),
        (
            "expired",
            Some(sign(
                json!({"role": "app_user", "user_pk": 1}),
                SECRET,
                -3600,
            )),
        ),
        ("not a JWT", Some("abc.def.ghi".to_owned())),
    ];
    for (case, token) in cases {
        let (status, response) = api.post(token.as_deref(), &body).await;
        assert_eq!(status, 401, "{case}: {response}");
        assert_eq!(error_code(&response), "UNAUTHENTICATED", "{case}");
    }
    let (status, _) = api.post(Some(&token_for(1)), &body).await;
    assert_eq!(status, 200);
    let introspection = api
        .gql(1, "{ __schema { queryType { name } } }", json!({}))
        .await;
    assert!(
        introspection["data"].is_null(),
        "introspection is off: {introspection}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_follow_mutations_and_row_level_security() -> anyhow::Result<()> {
    let api = start(&["run"], "").await?;
    let mut alice = Subscriber::connect(api.port, &token_for(1), false).await?;
    alice
        .subscribe("subscription { orderStatusUpdated { identifier status _cursor } }")
        .await?;
    let mut legacy = Subscriber::connect(api.port, &token_for(1), true).await?;
    legacy
        .subscribe("subscription { orderCreated { identifier } }")
        .await?;

    // A mutation's change reaches the subscriber through the WAL.
    let alice_order = api.create_order(1, "ord-alice", "10.00").await;
    let bob_order = api.create_order(2, "ord-bob", "20.00").await;
    let created = legacy.next_event().await?;
    assert_eq!(
        created["data"]["orderCreated"]["identifier"], "ord-alice",
        "{created}"
    );
    // Bob's order is invisible to Alice through v_order, so it is not delivered either.
    legacy.assert_silent(Duration::from_secs(2)).await;

    api.gql(
        2,
        "mutation($id: ID!) { updateOrderStatus(orderId: $id, status: \"paid\") { id } }",
        json!({"id": bob_order}),
    )
    .await;
    let updated = api
        .gql(
            1,
            "mutation($id: ID!) { updateOrderStatus(orderId: $id, status: \"paid\") { status } }",
            json!({"id": alice_order}),
        )
        .await;
    assert_eq!(
        updated["data"]["updateOrderStatus"]["status"], "paid",
        "{updated}"
    );
    let event = alice.next_event().await?;
    let payload = &event["data"]["orderStatusUpdated"];
    assert_eq!(payload["identifier"], "ord-alice", "{event}");
    assert_eq!(payload["status"], "paid");
    assert!(
        payload["_cursor"].as_str().is_some_and(|c| c.contains(':')),
        "{event}"
    );
    alice.assert_silent(Duration::from_secs(2)).await;

    // An argument filters on the event's data: this subscriber wants one order only.
    let other_order = api.create_order(1, "ord-alice-2", "11.00").await;
    let mut one_order = Subscriber::connect(api.port, &token_for(1), false).await?;
    one_order
        .subscribe(&format!(
            "subscription {{ orderStatusUpdated(orderId: \"{alice_order}\") {{ identifier status }} }}"
        ))
        .await?;
    for order in [&other_order, &alice_order] {
        api.gql(
            1,
            "mutation($id: ID!) { updateOrderStatus(orderId: $id, status: \"shipped\") { id } }",
            json!({"id": order}),
        )
        .await;
    }
    let filtered = one_order.next_event().await?;
    assert_eq!(
        filtered["data"]["orderStatusUpdated"]["identifier"], "ord-alice",
        "{filtered}"
    );
    one_order.assert_silent(Duration::from_secs(1)).await;

    // The same user's queries see the same rows.
    let mine = api
        .gql(
            1,
            "{ orders(orderBy: [{identifier: ASC}]) { identifier } }",
            json!({}),
        )
        .await;
    assert_eq!(
        mine["data"]["orders"],
        json!([{"identifier": "ord-alice"}, {"identifier": "ord-alice-2"}])
    );
    let theirs = api
        .gql(
            1,
            "query($id: ID!) { order(id: $id) { identifier } }",
            json!({"id": bob_order}),
        )
        .await;
    assert_eq!(theirs["data"]["order"], Value::Null);
    Ok(())
}

/// Resuming from a cursor replays exactly what was missed, then goes live.
async fn resume_gets_exactly_the_missed_events(commands: &[&str]) -> anyhow::Result<()> {
    let api = start(commands, "").await?;
    let order = api.create_order(1, "ord-resume", "5.00").await;
    let status_update = |status: &'static str| {
        let order = order.clone();
        let api = &api;
        async move {
            let response = api
                .gql(1, "mutation($id: ID!, $s: String!) { updateOrderStatus(orderId: $id, status: $s) { id } }", json!({"id": order, "s": status}))
                .await;
            assert!(response.get("errors").is_none(), "{response}");
        }
    };
    let query = |after: Option<&str>| {
        let after = after
            .map(|a| format!("(after: \"{a}\")"))
            .unwrap_or_default();
        format!("subscription {{ orderStatusUpdated{after} {{ status _cursor }} }}")
    };
    let mut first = Subscriber::connect(api.port, &token_for(1), false).await?;
    first.subscribe(&query(None)).await?;
    status_update("s1").await;
    let seen = first.next_event().await?;
    assert_eq!(seen["data"]["orderStatusUpdated"]["status"], "s1", "{seen}");
    let cursor = seen["data"]["orderStatusUpdated"]["_cursor"]
        .as_str()
        .expect("cursor")
        .to_owned();
    drop(first);

    // Missed while disconnected.
    for status in ["s2", "s3", "s4"] {
        status_update(status).await;
    }
    // Resume while changes keep coming: some are stored while the replay is being set up,
    // so they reach the server both from the stream and live.
    let mut resumed = Subscriber::connect(api.port, &token_for(1), false).await?;
    let client = api.cluster.client().await?;
    let writer_order = order.clone();
    let writer = tokio::spawn(async move {
        for i in 0..40 {
            client
                .execute(
                    "UPDATE tb_order SET status = $1 WHERE id = $2::text::uuid",
                    &[&format!("w{i}"), &writer_order],
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        anyhow::Ok(())
    });
    resumed
        .send(json!({"id": "1", "type": "subscribe", "payload": {"query": query(Some(&cursor))}}))
        .await?;
    writer.await??;
    let expected: Vec<String> = ["s2", "s3", "s4"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..40).map(|i| format!("w{i}")))
        .collect();
    let mut statuses = Vec::new();
    for _ in 0..expected.len() {
        let event = resumed.next_event().await?;
        statuses.push(
            event["data"]["orderStatusUpdated"]["status"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    resumed.assert_silent(Duration::from_secs(2)).await;
    assert_eq!(
        statuses, expected,
        "the missed events, then live; no gap, no duplicate"
    );
    let bad = {
        let mut client = Subscriber::connect(api.port, &token_for(1), false).await?;
        client.send(json!({"id": "1", "type": "subscribe", "payload": {"query": query(Some("nonsense"))}})).await?;
        client.next_message().await?
    };
    assert!(bad.to_string().contains("is not a cursor"), "{bad}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn resumed_subscription_in_the_sidecar() -> anyhow::Result<()> {
    resume_gets_exactly_the_missed_events(&["run"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn resumed_subscription_from_jetstream() -> anyhow::Result<()> {
    resume_gets_exactly_the_missed_events(&["stream", "serve"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_deep_and_complex_queries_are_refused() -> anyhow::Result<()> {
    let api = start(
        &["serve"],
        "max_depth = 2\nmax_complexity = 5\nmax_body_bytes = 2048\nmax_batch = 3\n\
         connection_init_timeout_secs = 1",
    )
    .await?;
    let big = json!({"query": format!("{{ orders {{ id }} }} #{}", "x".repeat(4096))});
    let (status, _) = api.post(Some(&token_for(1)), &big).await;
    assert_eq!(status, 413, "a body over max_body_bytes is refused");
    let fine = api.gql(1, "{ orders { id status } }", json!({})).await;
    assert!(fine.get("errors").is_none(), "{fine}");
    let too_deep = api
        .gql(
            1,
            "{ __type(name: \"Order\") { fields { name } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        too_deep["errors"][0]["message"], "Query is nested too deep.",
        "{too_deep}"
    );
    let too_complex = api
        .gql(
            1,
            "{ a: orders { id status } b: orders { id status } }",
            json!({}),
        )
        .await;
    assert_eq!(
        too_complex["errors"][0]["message"], "Query is too complex.",
        "{too_complex}"
    );
    // Batches: up to max_batch operations in one POST, a flood of them refused outright.
    let one = json!({"query": "{ orders { id } }"});
    let (status, body) = api.post(Some(&token_for(1)), &json!([one, one, one])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(3), "{body}");
    let flood = Value::Array(vec![one.clone(); 20]);
    let (status, body) = api.post(Some(&token_for(1)), &flood).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("20 operations") && m.contains("graphql.max_batch")),
        "{body}"
    );
    // A WebSocket that never sends connection_init is closed with 4408 after the timeout.
    let mut request = format!("ws://127.0.0.1:{}/graphql", api.port).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut silent, _) = tokio_tungstenite::connect_async(request).await?;
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = silent.next().await {
            if let Message::Close(frame) = message? {
                return anyhow::Ok(frame);
            }
        }
        anyhow::bail!("the socket ended without a close frame")
    })
    .await
    .map_err(|_| anyhow::anyhow!("a socket without connection_init stayed open"))??;
    let frame = closed.ok_or_else(|| anyhow::anyhow!("a close without a code"))?;
    assert_eq!(u16::from(frame.code), 4408, "{frame:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // One that does initialise stays open past the timeout.
    let mut subscriber = Subscriber::connect(api.port, &token_for(1), false).await?;
    subscriber.assert_silent(Duration::from_secs(2)).await;
    // GraphiQL is served to browsers.
    let (status, page) = http_get(api.port, "/graphql").await?;
    assert_eq!(status, 200);
    assert!(page.to_lowercase().contains("graphiql"), "GraphiQL page");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_falls_behind_gets_an_error_not_silent_drops() -> anyhow::Result<()> {
    let api = start(&["run"], "subscription_buffer = 1").await?;
    api.cluster
        .sql("INSERT INTO tb_order (identifier, fk_user, total) SELECT 'bulk-' || i, 1, i FROM generate_series(1, 300) i")
        .await?;
    let mut slow = Subscriber::connect(api.port, &token_for(1), false).await?;
    slow.subscribe("subscription { orderStatusUpdated { status } }")
        .await?;
    // 300 changes at once; each delivery waits for a lookup, so a one-event buffer overflows.
    api.cluster
        .sql("UPDATE tb_order SET status = 'paid'")
        .await?;
    let mut delivered = 0;
    let error = loop {
        let message = slow.next_message().await?;
        if let Some(errors) = message["payload"]["errors"]
            .as_array()
            .filter(|e| !e.is_empty())
        {
            break errors[0].clone();
        }
        anyhow::ensure!(
            message["type"] == "next",
            "ended without an error: {message}"
        );
        delivered += 1;
    };
    assert!(delivered < 300, "the subscriber did fall behind");
    let text = error["message"].as_str().unwrap_or_default();
    assert!(
        text.contains("fell") && text.contains("behind") && text.contains("after"),
        "{error}"
    );
    assert_eq!(error["extensions"]["code"], "SUBSCRIPTION_STOPPED");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_errors_name_the_line_and_the_object() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(EXAMPLE_SQL).await?;
    let example = std::fs::read_to_string(example_schema())?;
    let cases = [
        (
            "v_order",
            "v_missing",
            "type Order: view `v_missing` does not exist",
        ),
        (
            "fn_cancel_order",
            "fn_gone",
            "mutation cancelOrder: function `fn_gone` does not exist",
        ),
        (
            "createdAt: DateTime!",
            "createdAt: Timestamp!",
            "Order.createdAt: unknown type `Timestamp`",
        ),
        (
            "orderCreated: Order!",
            "orderCreated(: Order!",
            "syntax error",
        ),
    ];
    for (from, to, expected) in cases {
        let schema = cluster.dir.path().join("schema.graphql");
        std::fs::write(&schema, example.replace(from, to))?;
        let line = example
            .replace(from, to)
            .lines()
            .position(|l| l.contains(to))
            .map(|i| i + 1);
        let config = cluster.config(
            &["public.tb_order"],
            &format!(
                "[graphql]\nschema = \"{}\"\nanonymous_role = \"app_user\"\n",
                schema.display()
            ),
        )?;
        let output = std::process::Command::new(walstream_binary())
            .args(["serve", "--config"])
            .arg(&config)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{to}: must not start");
        assert!(stderr.contains(expected), "{to}: {stderr}");
        if expected != "syntax error" {
            let located = format!("schema.graphql:{}:", line.expect("line"));
            assert!(
                stderr.contains(&located),
                "{to}: expected {located} in {stderr}"
            );
        }
    }
    Ok(())
}

/// The feed's own guarantee, with the overlap made certain: events the pipeline announces
/// while the replay runs are also in the stream, and each must come out exactly once; another
/// client's message in the stream, even with walstream's headers, is no event.
#[tokio::test(flavor = "multi_thread")]
async fn replay_then_live_has_no_gap_and_no_duplicate() -> anyhow::Result<()> {
    use std::sync::Arc;
    use walstream::graphql::feed::{parse_cursor, Feed};
    use walstream::pipeline::sink::StoredEvent;

    let cluster = Cluster::start().await?;
    let js = cluster.jetstream().await?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await?;
    // Event i: committed at LSN 0/i, as walstream (slot "walstream") publishes it.
    let publish = |i: u64, id: Option<String>| {
        let js = js.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Walstream-Xid", "7");
            headers.insert("Walstream-Lsn", format!("0/{i:X}").as_str());
            headers.insert("Walstream-Seq", "0");
            let id = id.unwrap_or_else(|| format!("walstream:7:0/{i:X}:0"));
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = js
                .publish_with_headers("t.x", headers, format!("{i}").into())
                .await?
                .await?;
            anyhow::Ok(ack.sequence)
        }
    };
    let stored = |sequence: u64| {
        Arc::new(StoredEvent {
            stream_sequence: sequence,
            subject: "t.x".into(),
            payload: format!("{sequence}").into(),
        })
    };
    for i in 1..=10 {
        assert_eq!(publish(i, None).await?, i);
    }
    // Another client's message, walstream's headers under its own id, at sequence 11.
    assert_eq!(publish(3, Some("outbox:1".into())).await?, 11);
    let (live, _) = tokio::sync::broadcast::channel(64);
    let feed = Feed::new(
        js.clone(),
        STREAM.into(),
        "walstream".into(),
        Some(live.clone()),
    );
    let mut deliveries = feed.subscribe(None, Some(parse_cursor("0/2:0")?));
    for sequence in 5..=10 {
        live.send(stored(sequence))?;
    }
    for i in 11..=15 {
        let sequence = publish(i, None).await?;
        live.send(stored(sequence))?;
    }
    let mut sequences = Vec::new();
    while sequences.len() < 13 {
        let event = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the feed ended"))??;
        sequences.push(event.stream_sequence);
    }
    let expected: Vec<u64> = (3..=10).chain(12..=16).collect();
    assert_eq!(sequences, expected);
    let extra = tokio::time::timeout(Duration::from_millis(500), deliveries.recv()).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
    Ok(())
}

/// A repeated query is answered from a compiled plan (SQL plus a projection of `data`): it
/// must answer exactly as the executor does, for every user, and hand back to the executor
/// whatever it cannot answer the same way.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_queries_answer_as_the_executor_does_for_each_user() -> anyhow::Result<()> {
    // Embedded types, read per user through the claims (user 2's customer has no email,
    // which its non-null type forbids).
    let detail_view = "CREATE VIEW v_order_detail AS
         SELECT o.id, jsonb_build_object(
             'identifier', o.identifier, 'total', o.total,
             'customer', jsonb_build_object('name', u.name,
                                            'email', CASE WHEN u.pk_user = 1 THEN u.email END),
             'lines', jsonb_build_array(jsonb_build_object('sku', 'W-1', 'qty', 2),
                                        jsonb_build_object('sku', 'G-7', 'qty', 1))) AS data
         FROM tb_order o JOIN tb_user u ON u.pk_user = o.fk_user
         WHERE o.fk_user = (current_setting('request.jwt.claims', true)::jsonb->>'user_pk')::bigint;
         GRANT SELECT ON v_order_detail TO app_user;";
    let schema = std::fs::read_to_string(example_schema())?.replace(
        "type Query {",
        "type Customer { name: String! email: String! }\ntype Line { sku: String! qty: Int! }\n\
         type OrderDetail @view(name: \"v_order_detail\") { identifier: String! total: Decimal! \
         customer: Customer! lines: [Line!]! }\n\
         type Query {\n  orderDetails: [OrderDetail!]!",
    );
    // Two connections: the users' requests share them, so each switches identity often.
    let api = start_extended(&["serve"], "pool_size = 2", detail_view, Some(schema)).await?;
    for (user, identifier, total) in [(1, "a-1", "10.50"), (1, "a-2", "99"), (2, "b-1", "7.25")] {
        api.create_order(user, identifier, total).await;
    }
    let id_of_a1: String = api
        .cluster
        .client()
        .await?
        .query_one(
            "SELECT id::text FROM tb_order WHERE identifier = 'a-1'",
            &[],
        )
        .await?
        .get(0);

    let cases: Vec<(&str, Value)> = vec![
        (
            "query($id: ID!) { order(id: $id) { id identifier total status createdAt __typename } }",
            json!({"id": id_of_a1}),
        ),
        (
            "query($id: ID!) { order(id: $id) { identifier } }",
            json!({"id": "00000000-0000-0000-0000-000000000000"}),
        ),
        (
            "{ first: orders(orderBy: [{identifier: ASC}], limit: 1) { identifier total } all: orders { id } }",
            json!({}),
        ),
        (
            "query($like: String, $n: Int) { orders(where: {identifier: {like: $like}}, orderBy: [{total: DESC}], limit: $n) { identifier total } }",
            json!({"like": "%-%", "n": 5}),
        ),
        (
            "{ orderDetails(orderBy: [{identifier: ASC}]) { identifier total customer { name email } lines { sku qty __typename } } }",
            json!({}),
        ),
    ];
    for (query, variables) in &cases {
        // Learned from the executor's first answer, then answered from the plan: for
        // each user in turn, the plan's answer is the executor's (a root `__typename`, taken
        // out of the answer, keeps the second text away from any plan).
        let executor_only = format!("{} __typename }}", query.trim_end_matches('}'));
        let learned = api.gql(1, query, variables.clone()).await;
        assert!(learned.get("errors").is_none(), "{query}: {learned}");
        for user in [1, 2, 1, 2, 2, 1] {
            let planned = api.gql(user, query, variables.clone()).await;
            let mut executed = api.gql(user, &executor_only, variables.clone()).await;
            if let Some(data) = executed["data"].as_object_mut() {
                data.remove("__typename");
            }
            assert_eq!(planned, executed, "user {user}: {query}");
        }
    }

    // Row-level security follows each request's token through the shared connections.
    let mine = "{ orders(orderBy: [{identifier: ASC}]) { identifier } }";
    for _ in 0..4 {
        let alice = api.gql(1, mine, json!({})).await;
        assert_eq!(
            alice["data"]["orders"],
            json!([{"identifier": "a-1"}, {"identifier": "a-2"}])
        );
        let bob = api.gql(2, mine, json!({})).await;
        assert_eq!(bob["data"]["orders"], json!([{"identifier": "b-1"}]));
    }

    // Which operation of a document runs depends on the request's operationName, so a plan
    // learned for one name never answers another, nor a request the executor refuses.
    let two = "query A { orders(orderBy: [{identifier: ASC}]) { identifier } } \
               query B { orders(orderBy: [{identifier: DESC}], limit: 1) { identifier } }";
    let named = |query: &str, name: Option<&str>| {
        let mut body = json!({"query": query, "variables": {}});
        if let Some(name) = name {
            body["operationName"] = json!(name);
        }
        body
    };
    let token = token_for(1);
    for _ in 0..2 {
        for (name, expected) in [
            (
                Some("A"),
                json!([{"identifier": "a-1"}, {"identifier": "a-2"}]),
            ),
            (Some("B"), json!([{"identifier": "a-2"}])),
        ] {
            let (_, answer) = api.post(Some(&token), &named(two, name)).await;
            assert_eq!(answer["data"]["orders"], expected, "{name:?}: {answer}");
        }
        for name in [None, Some("C")] {
            let (_, answer) = api.post(Some(&token), &named(two, name)).await;
            assert!(
                answer["errors"][0]["message"].is_string(),
                "{name:?}: {answer}"
            );
            assert!(
                answer.get("data").is_none_or(Value::is_null),
                "{name:?}: {answer}"
            );
        }
    }
    let one = "query Mine { orders(orderBy: [{identifier: ASC}], limit: 1) { identifier } }";
    let anonymous = "{ orders(orderBy: [{identifier: ASC}], limit: 1) { identifier } }";
    for _ in 0..2 {
        for (query, name) in [(one, None), (one, Some("Mine")), (anonymous, None)] {
            let (_, answer) = api.post(Some(&token), &named(query, name)).await;
            assert_eq!(
                answer["data"]["orders"],
                json!([{"identifier": "a-1"}]),
                "{answer}"
            );
        }
        let (_, answer) = api
            .post(Some(&token), &named(anonymous, Some("Mine")))
            .await;
        assert!(answer["errors"][0]["message"].is_string(), "{answer}");
    }

    // Data that does not fit the schema (user 2's null email) goes back to the executor,
    // which reports it where it is.
    let details = api.gql(2, cases[4].0, json!({})).await;
    assert_eq!(
        details["errors"][0]["path"],
        json!(["orderDetails", 0, "customer", "email"]),
        "{details}"
    );

    // A variable of the wrong type gets the executor's validation error, every time.
    let paged = "query($n: Int) { orders(limit: $n) { identifier } }";
    api.gql(1, paged, json!({"n": 1})).await;
    for _ in 0..2 {
        let wrong = api.gql(1, paged, json!({"n": "many"})).await;
        assert!(wrong["errors"][0]["message"].as_str().is_some(), "{wrong}");
        assert!(wrong.get("data").is_none_or(Value::is_null), "{wrong}");
    }
    let missing = "query($id: ID!) { order(id: $id) { id } }";
    api.gql(1, missing, json!({"id": id_of_a1})).await;
    let without = api.gql(1, missing, json!({})).await;
    assert!(
        without["errors"][0]["message"].as_str().is_some(),
        "{without}"
    );
    // A bad argument value, caught by the SQL side, is reported as the executor reports it.
    let hostile = api.gql(1, missing, json!({"id": "x' OR 1=1 --"})).await;
    assert_eq!(error_code(&hostile), "BAD_USER_INPUT", "{hostile}");

    // Mutations: once learned, a plan calls the function and answers success and failure as
    // the executor does; a variable the executor would refuse never reaches the function.
    let update = "mutation($id: ID!, $s: String!) { updateOrderStatus(orderId: $id, status: $s) { id status } }";
    let learned = api
        .gql(1, update, json!({"id": id_of_a1, "s": "paid"}))
        .await;
    assert_eq!(
        learned["data"]["updateOrderStatus"]["status"], "paid",
        "{learned}"
    );
    let nowhere = json!({"id": "00000000-0000-0000-0000-000000000000", "s": "paid"});
    let mut planned = api.gql(1, update, nowhere.clone()).await;
    // The same field through a fragment, which no plan takes: the same answer but where the
    // field stands in the text.
    let by_executor = "mutation($id: ID!, $s: String!) { ...F } fragment F on Mutation { updateOrderStatus(orderId: $id, status: $s) { id status } }";
    let mut executed = api.gql(1, by_executor, nowhere).await;
    let column = |text: &str| text.find("updateOrderStatus").map(|i| i + 1);
    let located = |response: &mut Value| {
        response["errors"][0]
            .as_object_mut()
            .and_then(|e| e.remove("locations"))
    };
    assert_eq!(
        located(&mut planned),
        Some(json!([{"line": 1, "column": column(update)}])),
        "{planned}"
    );
    assert_eq!(
        located(&mut executed),
        Some(json!([{"line": 1, "column": column(by_executor)}]))
    );
    assert_eq!(
        planned["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{planned}"
    );
    assert_eq!(planned, executed);
    let shipped = api
        .gql(1, update, json!({"id": id_of_a1, "s": "shipped"}))
        .await;
    assert_eq!(
        shipped["data"]["updateOrderStatus"],
        json!({"id": id_of_a1, "status": "shipped"}),
        "{shipped}"
    );

    let create =
        "mutation($i: CreateOrderInput!) { createOrder(input: $i) { identifier total status } }";
    for identifier in ["c-1", "c-2", "c-3"] {
        let created = api
            .gql(
                1,
                create,
                json!({"i": {"identifier": identifier, "total": "5.50"}}),
            )
            .await;
        assert_eq!(
            created["data"]["createOrder"],
            json!({"identifier": identifier, "total": "5.50", "status": "pending"}),
            "{created}"
        );
    }
    let count = |identifier: &'static str| {
        let cluster = &api.cluster;
        async move {
            let client = cluster.client().await?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM tb_order WHERE identifier = $1",
                    &[&identifier],
                )
                .await?;
            anyhow::Ok(row.get::<_, i64>(0))
        }
    };
    for refused in [
        json!({"i": {"identifier": "c-4"}}),
        json!({"i": {"identifier": "c-4", "total": "5.50", "extra": 1}}),
        json!({"i": {"identifier": "c-4", "total": "lots"}}),
    ] {
        let response = api.gql(1, create, refused.clone()).await;
        assert!(
            response["errors"][0]["message"].is_string(),
            "{refused}: {response}"
        );
    }
    assert_eq!(count("c-4").await?, 0, "a refused input wrote nothing");
    Ok(())
}

/// GraphiQL in a real browser on a machine without internet: the page and every script come
/// from walstream, it renders, and a query typed into it (with the token typed into its
/// headers) returns data.
#[tokio::test(flavor = "multi_thread")]
async fn the_explorer_renders_offline_and_answers_a_typed_query() -> anyhow::Result<()> {
    let api = start(&["serve"], "").await?;
    api.create_order(1, "typed-1", "12.50").await;
    let (status, page) = http_get(api.port, "/graphql").await?;
    assert_eq!(status, 200);
    assert!(
        !page.contains("://"),
        "the page loads nothing from elsewhere:\n{page}"
    );

    let browser = browser::Browser::start()?;
    let mut tab = browser
        .open(&format!("http://127.0.0.1:{}/graphql", api.port))
        .await?;
    let editor = |selector: &str| {
        format!(
            "(() => {{ const all = document.querySelectorAll('{selector}'); \
             const cm = all[all.length - 1].CodeMirror; cm.setValue(''); cm.focus(); \
             return true; }})()"
        )
    };
    tab.wait_for(
        "!!document.querySelector('.graphiql-query-editor .CodeMirror')",
        Duration::from_secs(30),
        "GraphiQL to render",
    )
    .await?;
    tab.eval(
        "[...document.querySelectorAll('.graphiql-editor-tools button')] \
         .find(b => b.textContent.trim() === 'Headers').click()",
    )
    .await?;
    tab.eval(&editor(".graphiql-editor-tool .CodeMirror"))
        .await?;
    tab.type_text(&format!(
        r#"{{"Authorization": "Bearer {}"}}"#,
        token_for(1)
    ))
    .await?;
    tab.eval(&editor(".graphiql-query-editor .CodeMirror"))
        .await?;
    tab.type_text("{ orders { identifier total } }").await?;
    tab.eval("document.querySelector('.graphiql-execute-button').click()")
        .await?;
    let answer = tab
        .wait_for(
            "(() => { const r = document.querySelector('.graphiql-response .CodeMirror'); \
             const text = r && r.CodeMirror.getValue(); \
             return text && text.includes('typed-1') ? text : null; })()",
            Duration::from_secs(30),
            "the typed query's answer",
        )
        .await?;
    let answer: Value = serde_json::from_str(answer.as_str().unwrap_or_default())?;
    assert_eq!(
        answer["data"]["orders"],
        json!([{"identifier": "typed-1", "total": "12.50"}])
    );
    let elsewhere = tab
        .eval(
            "performance.getEntriesByType('resource').map(e => e.name) \
             .filter(n => !n.startsWith(location.origin))",
        )
        .await?;
    assert_eq!(elsewhere, json!([]), "requests that left walstream");
    Ok(())
}
