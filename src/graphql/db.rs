//! PostgreSQL for GraphQL requests: a pool of sessions that remember whose identity they
//! carry, so a read is one statement, and a transaction per mutation, each in one round trip.

use deadpool::managed::{self, Metrics, RecycleResult};
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Row};

use super::auth::Identity;
use super::sql::Param;

/// Statements a connection keeps prepared before its cache is cleared; `where` filters come
/// in as many shapes as clients write, so the cache must not grow without bound.
const STATEMENT_CACHE_LIMIT: usize = 512;

/// The identity for one transaction (mutations). A failure aborts the transaction, so nothing
/// after it runs as anyone.
const LOCAL_SETTINGS: &str = "SELECT set_config('request.jwt.claims', $1, true), \
                              set_config('role', $2, true)";
/// The identity for the session (reads), sent inside a transaction so that it is kept only if
/// the read beside it succeeded; `role` 'none' is the pool's own user.
const SESSION_SETTINGS: &str = "SELECT set_config('request.jwt.claims', $1, false), \
                                set_config('role', $2, false)";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot get a database connection: {0}")]
    Pool(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

type Pool = managed::Pool<SessionManager>;

/// A pooled connection and the identity its session carries.
pub struct Session {
    pub client: ClientWrapper,
    /// The claims and role last set for the whole session and committed; `None` before the
    /// first, and while a change is in flight (a cancelled request leaves it unknown).
    identity: Option<(String, Option<String>)>,
}

impl Session {
    fn carries(&self, identity: &Identity) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|(claims, role)| *claims == identity.claims_json && *role == identity.role)
    }
}

/// deadpool-postgres' manager, with each connection's session identity beside it.
pub struct SessionManager(Manager);

impl managed::Manager for SessionManager {
    type Type = Session;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<Session, Self::Error> {
        Ok(Session {
            client: managed::Manager::create(&self.0).await?,
            identity: None,
        })
    }

    async fn recycle(
        &self,
        session: &mut Session,
        metrics: &Metrics,
    ) -> RecycleResult<Self::Error> {
        managed::Manager::recycle(&self.0, &mut session.client, metrics).await
    }

    fn detach(&self, session: &mut Session) {
        managed::Manager::detach(&self.0, &mut session.client);
    }
}

#[derive(Clone)]
pub struct Database {
    pool: Pool,
}

/// One statement of a transaction and its parameters.
pub struct Statement<'a> {
    pub sql: &'a str,
    pub params: &'a [Param],
}

impl Database {
    pub fn new(url: &str, size: usize, statement_timeout_ms: u64) -> anyhow::Result<Self> {
        let (mut config, tls) = crate::postgres::parse_url(url)?;
        // DateTime fields come out of `data` in UTC whatever the server's time zone. Sessions
        // are read-only unless a mutation's transaction says otherwise.
        let options = format!(
            "{} -c TimeZone=UTC -c statement_timeout={statement_timeout_ms} \
             -c default_transaction_read_only=on",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim_start());
        if config.get_application_name().is_none() {
            config.application_name("walstream-graphql");
        }
        // A server that accepts and never answers must fail the request, not hold it.
        let connect_timeout = config.get_connect_timeout().copied();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if tls.enabled() {
            Manager::from_config(config, tls.connector()?, manager_config)
        } else {
            Manager::from_config(config, NoTls, manager_config)
        };
        let pool = Pool::builder(SessionManager(manager))
            .max_size(size)
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(connect_timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("connection pool: {e}"))?;
        Ok(Self { pool })
    }

    pub async fn client(&self) -> Result<managed::Object<SessionManager>, DbError> {
        let session = self
            .pool
            .get()
            .await
            .map_err(|e| DbError::Pool(crate::secrets::redact_urls(&e.to_string())))?;
        if session.client.statement_cache.size() > STATEMENT_CACHE_LIMIT {
            session.client.statement_cache.clear();
        }
        Ok(session)
    }

    /// Runs one read-only statement as `identity`: the statement alone when the session
    /// already carries that identity, else inside a transaction that sets it for the session.
    pub async fn read(
        &self,
        identity: &Identity,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Row>, DbError> {
        let mut session = self.client().await?;
        let types: Vec<Type> = params.iter().map(Param::sql_type).collect();
        let statement = session.client.prepare_typed_cached(sql, &types).await?;
        let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(Param::as_sql).collect();
        if session.carries(identity) {
            return Ok(session.client.query(&statement, &values).await?);
        }
        let settings = session
            .client
            .prepare_typed_cached(SESSION_SETTINGS, &[Type::TEXT, Type::TEXT])
            .await?;
        let role = identity.role.as_deref().unwrap_or("none");
        session.identity = None;
        let client = &session.client;
        let setting_values: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&identity.claims_json, &role];
        // futures::join! polls in order, and each future sends its request on first poll:
        // the server receives BEGIN, the settings, the read and COMMIT in that order, and a
        // failed setting aborts the transaction before the read runs.
        let (begun, set, rows, committed) = futures::join!(
            client.batch_execute("BEGIN READ ONLY"),
            client.query(&settings, &setting_values),
            client.query(&statement, &values),
            client.batch_execute("COMMIT"),
        );
        begun?;
        set?;
        let rows = rows?;
        committed?;
        session.identity = Some((identity.claims_json.clone(), identity.role.clone()));
        Ok(rows)
    }

    /// Runs `statements` in one read-write transaction as `identity` (sessions are read-only
    /// otherwise). BEGIN, the identity's settings, the statements and COMMIT are pipelined, so
    /// a request costs one round trip; when a statement fails, PostgreSQL turns the COMMIT into
    /// a ROLLBACK.
    pub async fn write_transaction(
        &self,
        identity: &Identity,
        statements: &[Statement<'_>],
    ) -> Result<Vec<Vec<Row>>, DbError> {
        let session = self.client().await?;
        let client = &session.client;
        let settings = client
            .prepare_typed_cached(LOCAL_SETTINGS, &[Type::TEXT, Type::TEXT])
            .await?;
        let mut prepared = Vec::with_capacity(statements.len());
        for statement in statements {
            let types: Vec<Type> = statement.params.iter().map(Param::sql_type).collect();
            prepared.push(client.prepare_typed_cached(statement.sql, &types).await?);
        }
        // Without a role claim, 'none': the login user, not a role an earlier read left on the
        // session.
        let role = identity.role.as_deref().unwrap_or("none");
        let setting_values: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&identity.claims_json, &role];
        let params: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = statements
            .iter()
            .map(|s| s.params.iter().map(Param::as_sql).collect())
            .collect();
        // futures::join! polls in order, and each future sends its request on first poll:
        // the server receives BEGIN, settings, statements, COMMIT in that order.
        let (begun, set, results, committed) = futures::join!(
            client.batch_execute("BEGIN READ WRITE"),
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
