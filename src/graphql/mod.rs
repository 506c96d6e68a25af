//! The GraphQL front end: queries read views, mutations call SQL functions, and
//! subscriptions follow the change stream the pipeline writes.

pub mod auth;
pub mod catalog;
mod compiled;
pub mod db;
mod explorer;
pub mod feed;
pub mod mutation;
mod query_cache;
mod scalars;
pub mod schema;
pub mod sdl;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use async_graphql::dynamic::Schema;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{Data, Executor};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::broadcast;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::nats;
use crate::pipeline::sink::StoredEvent;
use auth::{AuthError, Authenticator, Identity};
use compiled::{Lookup, Plans};
use db::Database;
use feed::Feed;
use query_cache::QueryCache;
use schema::Runtime;

#[derive(Clone)]
struct Endpoint {
    schema: Schema,
    auth: Arc<Authenticator>,
    queries: Arc<QueryCache>,
    plans: Arc<Plans>,
    graphiql: bool,
    max_batch: usize,
    connection_init_timeout: Duration,
}

/// Reads the schema file, checks it against the database, connects to NATS for
/// subscriptions and returns the `/graphql` router. `live` is the in-process pipeline's
/// stream of stored events (`walstream run`); without it subscriptions read JetStream.
pub async fn router(
    config: &Config,
    metrics: Arc<Metrics>,
    live: Option<broadcast::Sender<Arc<StoredEvent>>>,
) -> anyhow::Result<Router> {
    let graphql = config.graphql()?;
    let file = graphql.schema.display().to_string();
    let text = std::fs::read_to_string(&graphql.schema)
        .map_err(|e| anyhow::anyhow!("graphql.schema {file}: cannot read: {e}"))?;
    let sdl = sdl::parse(&text, &file)?;
    let auth = Authenticator::from_config(graphql)?;
    let db = Database::new(
        &config.database.url,
        graphql.pool_size,
        graphql.statement_timeout_ms,
    )?;
    let client = db
        .client()
        .await
        .map_err(|e| anyhow::anyhow!("GraphQL: {e}"))?;
    let nats = nats::connect(&config.nats, metrics, Duration::from_secs(30)).await?;
    let feed = Feed::new(
        async_nats::jetstream::new(nats),
        config.nats.stream_name.clone(),
        config.replication.slot.clone(),
        live,
    );
    let runtime = Arc::new(Runtime {
        db,
        feed: Some(feed),
        default_limit: graphql.default_limit,
        max_limit: graphql.max_limit,
    });
    let (schema, reads) = schema::build(&sdl, &file, graphql, &*client.client, runtime).await?;
    drop(client);
    let endpoint = Endpoint {
        schema,
        auth,
        queries: Arc::default(),
        plans: Arc::new(Plans::new(reads)),
        graphiql: graphql.graphiql,
        max_batch: graphql.max_batch,
        connection_init_timeout: Duration::from_secs(graphql.connection_init_timeout_secs),
    };
    let mut router = Router::new().route("/graphql", get(graphql_get).post(graphql_post));
    if graphql.graphiql {
        router = router.route("/graphql/assets/{name}", get(explorer::asset));
    }
    Ok(router
        .layer(DefaultBodyLimit::max(graphql.max_body_bytes))
        .with_state(endpoint))
}

fn unauthorized(error: AuthError) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": error.to_string(), "extensions": { "code": "UNAUTHENTICATED" } }]
    });
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn graphql_post(
    State(endpoint): State<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let identity = match endpoint.auth.identify(authorization(&headers)) {
        Ok(identity) => identity,
        Err(error) => return unauthorized(error),
    };
    let request = match parse_body(&body, endpoint.max_batch) {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    let plain = match request {
        Posted::Single(plain) => plain,
        Posted::Batch(mut batch) => {
            for single in batch.iter_mut() {
                endpoint.queries.prepare(single);
            }
            let batch = async_graphql::BatchRequest::Batch(batch).data(identity);
            let response = endpoint.schema.execute_batch(batch).await;
            return Json(response).into_response();
        }
    };
    let learn = match endpoint
        .plans
        .lookup(&plain.query, plain.operation_name.as_deref())
    {
        Lookup::Plan(plan) => {
            if let Some(response) = answer_compiled(&endpoint, &plan, &plain, &identity).await {
                return response;
            }
            false
        }
        Lookup::Unknown => true,
        Lookup::NotCompilable => false,
    };
    let mut single = plain.to_request();
    endpoint.queries.prepare(&mut single);
    let response = endpoint.schema.execute(single.data(identity)).await;
    if learn && response.is_ok() {
        if let Some(document) = endpoint.queries.lookup(&plain.query) {
            endpoint
                .plans
                .learn(&plain.query, plain.operation_name.as_deref(), &document);
        }
    }
    Json(response).into_response()
}

/// A POST body: one request, or a batch of them.
enum Posted<'a> {
    Single(PlainRequest<'a>),
    Batch(Vec<async_graphql::Request>),
}

/// Reads the body once: a JSON array is a batch (at most `max_batch` operations), anything else
/// one request.
fn parse_body(body: &[u8], max_batch: usize) -> Result<Posted<'_>, String> {
    let not_graphql =
        |error: serde_json::Error| format!("the body is not a GraphQL request: {error}");
    let is_batch = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if !is_batch {
        return serde_json::from_slice(body)
            .map(Posted::Single)
            .map_err(not_graphql);
    }
    let batch: Vec<async_graphql::Request> = serde_json::from_slice(body).map_err(not_graphql)?;
    if batch.len() > max_batch {
        return Err(format!(
            "a batch of {} operations; at most {max_batch} are allowed (graphql.max_batch)",
            batch.len()
        ));
    }
    Ok(Posted::Batch(batch))
}

/// A single GraphQL request as posted, read without copying the query text.
#[derive(serde::Deserialize)]
struct PlainRequest<'a> {
    #[serde(borrow)]
    query: std::borrow::Cow<'a, str>,
    #[serde(default, rename = "operationName")]
    operation_name: Option<String>,
    #[serde(default)]
    variables: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    extensions: async_graphql_value::Extensions,
}

impl PlainRequest<'_> {
    /// The request as the executor takes it.
    fn to_request(&self) -> async_graphql::Request {
        let mut request = async_graphql::Request::new(self.query.as_ref());
        if let Some(name) = &self.operation_name {
            request = request.operation_name(name);
        }
        if let Some(variables) = &self.variables {
            let variables = serde_json::Value::Object(variables.clone());
            request = request.variables(async_graphql::Variables::from_json(variables));
        }
        request.extensions = self.extensions.clone();
        request
    }
}

async fn answer_compiled(
    endpoint: &Endpoint,
    plan: &compiled::Plan,
    request: &PlainRequest<'_>,
    identity: &Identity,
) -> Option<Response> {
    let no_variables = serde_json::Map::new();
    let variables = request.variables.as_ref().unwrap_or(&no_variables);
    let body = endpoint
        .plans
        .answer(plan, variables, identity)
        .await
        .ok()?;
    Some(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn bad_request(message: String) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": "BAD_REQUEST" } }]
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// GraphiQL for browsers, subscriptions for WebSocket clients.
async fn graphql_get(State(endpoint): State<Endpoint>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return if endpoint.graphiql {
            explorer::page()
        } else {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                "POST GraphQL requests to /graphql",
            )
                .into_response()
        };
    }
    let protocol = match GraphQLProtocol::from_request_parts(&mut parts, &()).await {
        Ok(protocol) => protocol,
        Err(rejection) => return rejection.into_response(),
    };
    let socket = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(socket) => socket,
        Err(rejection) => return rejection.into_response(),
    };
    let header_token = authorization(&parts.headers).map(str::to_owned);
    socket
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| serve_socket(socket, endpoint, protocol, header_token))
}

/// One subscription connection. Replies go through a channel to the socket, so that a client
/// that never sends `connection_init` can be closed with 4408, as graphql-transport-ws asks,
/// instead of holding a connection open forever.
async fn serve_socket(
    socket: axum::extract::ws::WebSocket,
    endpoint: Endpoint,
    protocol: GraphQLProtocol,
    header_token: Option<String>,
) {
    use axum::extract::ws::{CloseFrame, Message};
    use futures::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicBool, Ordering};

    let (mut socket_sink, socket_stream) = socket.split();
    let (replies, mut outgoing) = futures::channel::mpsc::channel::<Message>(16);
    let initialised = Arc::new(AtomicBool::new(false));
    let auth = endpoint.auth.clone();
    let init_flag = initialised.clone();
    let serve = GraphQLWebSocket::new_with_pair(replies, socket_stream, endpoint.schema, protocol)
        .on_connection_init(move |payload| async move {
            let token = connection_token(&payload).or(header_token);
            let identity = auth
                .identify(token.as_deref())
                .map_err(|e| async_graphql::Error::new(e.to_string()))?;
            init_flag.store(true, Ordering::Relaxed);
            let mut data = Data::default();
            data.insert(identity);
            Ok(data)
        })
        .serve();
    let forward = async move {
        let deadline = tokio::time::sleep(endpoint.connection_init_timeout);
        tokio::pin!(deadline);
        let mut awaiting_init = true;
        loop {
            tokio::select! {
                reply = outgoing.next() => match reply {
                    Some(message) => {
                        if socket_sink.send(message).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                _ = &mut deadline, if awaiting_init => {
                    if initialised.load(Ordering::Relaxed) {
                        awaiting_init = false;
                    } else {
                        let close = CloseFrame {
                            code: 4408,
                            reason: "Connection initialisation timeout".into(),
                        };
                        let _ = socket_sink.send(Message::Close(Some(close))).await;
                        return;
                    }
                }
            }
        }
    };
    tokio::pin!(forward);
    tokio::select! {
        // The protocol ended: send what it still queued (its closing frame).
        _ = serve => forward.await,
        _ = &mut forward => {}
    }
}

/// The bearer token a WebSocket client sent in `connection_init`: `{"Authorization": …}`,
/// `{"headers": {"Authorization": …}}` or `{"token": …}`.
fn connection_token(payload: &serde_json::Value) -> Option<String> {
    let find = |object: &serde_json::Value| {
        object.as_object().and_then(|map| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .and_then(|(_, v)| v.as_str())
                .map(str::to_owned)
        })
    };
    find(payload)
        .or_else(|| find(&payload["headers"]))
        .or_else(|| payload["token"].as_str().map(|t| format!("Bearer {t}")))
}
