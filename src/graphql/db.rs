//! PostgreSQL for GraphQL requests: a connection pool, and one transaction per resolver that
//! carries the caller's identity, sent to the server in a single round trip.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Row};

use super::auth::Identity;
use super::sql::Param;

/// Statements a connection keeps prepared before its cache is cleared; `where` filters come
/// in as many shapes as clients write, so the cache must not grow without bound.
const STATEMENT_CACHE_LIMIT: usize = 512;

const SETTINGS: &str = "SELECT set_config('request.jwt.claims', $1, true), \
                        set_config('statement_timeout', $2, true)";
const SETTINGS_WITH_ROLE: &str = "SELECT set_config('request.jwt.claims', $1, true), \
                                  set_config('statement_timeout', $2, true), \
                                  set_config('role', $3, true)";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot get a database connection: {0}")]
    Pool(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

#[derive(Clone)]
pub struct Database {
    pool: Pool,
    statement_timeout_ms: String,
}

/// Whether a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// One statement of a transaction and its parameters.
pub struct Statement<'a> {
    pub sql: &'a str,
    pub params: &'a [Param],
}

impl Database {
    pub fn new(url: &str, size: usize, statement_timeout_ms: u64) -> anyhow::Result<Self> {
        let (mut config, tls) = crate::postgres::parse_url(url)?;
        if config.get_options().is_none() {
            // DateTime fields come out of `data` in UTC whatever the server's time zone.
            config.options("-c TimeZone=UTC");
        }
        if config.get_application_name().is_none() {
            config.application_name("walstream-graphql");
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if tls.enabled() {
            Manager::from_config(config, tls.connector()?, manager_config)
        } else {
            Manager::from_config(config, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(size)
            .build()
            .map_err(|e| anyhow::anyhow!("connection pool: {e}"))?;
        Ok(Self {
            pool,
            statement_timeout_ms: statement_timeout_ms.to_string(),
        })
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool
            .get()
            .await
            .map_err(|e| DbError::Pool(crate::secrets::redact_urls(&e.to_string())))
    }

    /// Runs one read-only statement as `identity`.
    pub async fn read(
        &self,
        identity: &Identity,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Row>, DbError> {
        let statement = Statement { sql, params };
        let mut results = self
            .transaction(identity, Access::ReadOnly, &[statement])
            .await?;
        Ok(results.pop().unwrap_or_default())
    }

    /// Runs `statements` in one transaction as `identity`. BEGIN, the identity's settings, the
    /// statements and COMMIT are pipelined, so a request costs one round trip; when a
    /// statement fails, PostgreSQL turns the COMMIT into a ROLLBACK.
    pub async fn transaction(
        &self,
        identity: &Identity,
        access: Access,
        statements: &[Statement<'_>],
    ) -> Result<Vec<Vec<Row>>, DbError> {
        let client = self.client().await?;
        if client.statement_cache.size() > STATEMENT_CACHE_LIMIT {
            client.statement_cache.clear();
        }
        let settings_sql = if identity.role.is_some() {
            SETTINGS_WITH_ROLE
        } else {
            SETTINGS
        };
        let settings = client
            .prepare_typed_cached(
                settings_sql,
                &[Type::TEXT, Type::TEXT, Type::TEXT]
                    [..if identity.role.is_some() { 3 } else { 2 }],
            )
            .await?;
        let mut prepared = Vec::with_capacity(statements.len());
        for statement in statements {
            let types: Vec<Type> = statement.params.iter().map(Param::sql_type).collect();
            prepared.push(client.prepare_typed_cached(statement.sql, &types).await?);
        }
        let mut setting_values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&identity.claims_json, &self.statement_timeout_ms];
        if let Some(role) = &identity.role {
            setting_values.push(role);
        }
        let begin = match access {
            Access::ReadOnly => "BEGIN READ ONLY",
            Access::ReadWrite => "BEGIN",
        };
        let params: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = statements
            .iter()
            .map(|s| s.params.iter().map(Param::as_sql).collect())
            .collect();
        // futures::join! polls in order, and each future sends its request on first poll:
        // the server receives BEGIN, settings, statements, COMMIT in that order.
        let (begun, set, results, committed) = futures::join!(
            client.batch_execute(begin),
            client.query(&settings, &setting_values),
            futures::future::join_all(
                prepared
                    .iter()
                    .zip(&params)
                    .map(|(statement, values)| client.query(statement, values))
            ),
            client.batch_execute("COMMIT"),
        );
        begun?;
        set?;
        let rows = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        committed?;
        Ok(rows)
    }
}

/// A database failure as the client sees it: the class of problem and PostgreSQL's own
/// message where that message is about the request (bad input, constraint, permission), and
/// nothing but a code otherwise. SQL text and connection details never leave the server.
pub fn client_error(error: DbError) -> async_graphql::Error {
    use async_graphql::ErrorExtensions;
    let (code, message) = match &error {
        DbError::Pool(detail) => {
            tracing::warn!("graphql: {detail}");
            (
                "DATABASE_UNAVAILABLE",
                "the database is not reachable".to_owned(),
            )
        }
        DbError::Postgres(e) => match e.as_db_error() {
            Some(db) => {
                let state = db.code().code();
                match &state[..2] {
                    "22" => ("BAD_USER_INPUT", db.message().to_owned()),
                    "23" => ("CONSTRAINT_VIOLATION", db.message().to_owned()),
                    "42" if state == "42501" => ("FORBIDDEN", db.message().to_owned()),
                    "P0" => ("FAILED", db.message().to_owned()),
                    "57" if state == "57014" => (
                        "TIMEOUT",
                        "the statement timed out (graphql.statement_timeout_ms)".to_owned(),
                    ),
                    "40" => ("RETRY", db.message().to_owned()),
                    _ => {
                        tracing::error!(
                            sqlstate = state,
                            "graphql: database error: {}",
                            db.message()
                        );
                        (
                            "INTERNAL",
                            "internal error; the server log has the details".to_owned(),
                        )
                    }
                }
            }
            None => {
                tracing::warn!("graphql: database connection: {e}");
                (
                    "DATABASE_UNAVAILABLE",
                    "the database connection failed".to_owned(),
                )
            }
        },
    };
    async_graphql::Error::new(message).extend_with(|_, ext| ext.set("code", code))
}
