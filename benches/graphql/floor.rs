//! The floor: a bare axum + tokio-postgres server answering the lookup with the row's `data`,
//! one pooled prepared statement and no GraphQL, no identity: what any Rust HTTP front end on
//! this machine pays, below every GraphQL server.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub fn serve(port: u16, url: &str, pool_size: usize) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = url.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager).max_size(pool_size).build()?;
        let app = axum::Router::new()
            .route("/graphql", axum::routing::post(lookup))
            .with_state(pool);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn lookup(State(pool): State<Pool>, body: axum::body::Bytes) -> Response {
    match answer(&pool, &body).await {
        Ok(data) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"data\":{{\"order\":{data}}}}}"),
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn answer(pool: &Pool, body: &[u8]) -> anyhow::Result<String> {
    let request: serde_json::Value = serde_json::from_slice(body)?;
    let id = request["variables"]["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no id"))?;
    let client = pool.get().await?;
    let statement = client
        .prepare_cached("SELECT data::text FROM v_order WHERE id = $1::text::uuid")
        .await?;
    let row = client.query_one(&statement, &[&id]).await?;
    Ok(row.get(0))
}
