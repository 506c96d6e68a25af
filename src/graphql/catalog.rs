//! What the database says about the views and functions a schema names: their columns,
//! parameters and types, checked once at start-up.

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

/// A view (or table) a query reads `data` from.
#[derive(Debug, Clone)]
pub struct View {
    /// Quoted, ready for SQL: `"public"."v_order"`.
    pub sql_name: String,
    /// Column name → type as `format_type` writes it.
    pub columns: BTreeMap<String, String>,
}

/// A function a mutation calls.
#[derive(Debug, Clone)]
pub struct Function {
    pub sql_name: String,
    pub params: Vec<Param>,
    pub response: ResponseForm,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub sql_type: String,
    pub has_default: bool,
}

/// Which `mutation_response` a function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseForm {
    /// `status, message, entity_id, entity_type, entity, …` (FraiseQL 1.x and the seeds).
    Status,
    /// `succeeded, state_changed, error_class, …` (FraiseQL 2.x, 13 columns).
    Succeeded,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("view `{0}` does not exist (looked in the search_path of the database user)")]
    NoView(String),
    #[error("view `{0}` has no `data` column of type jsonb or json (it has: {1})")]
    NoDataColumn(String, String),
    #[error("function `{0}` does not exist (looked in the search_path of the database user)")]
    NoFunction(String),
    #[error(
        "function `{0}` is overloaded ({1}); give each mutation a function with one signature"
    )]
    Overloaded(String, String),
    #[error("function `{name}`: {message}")]
    BadFunction { name: String, message: String },
    #[error("reading the catalog: {0}")]
    Query(#[from] tokio_postgres::Error),
}

pub async fn view(client: &impl GenericClient, name: &str) -> Result<View, CatalogError> {
    let row = client
        .query_opt(
            "SELECT c.oid::regclass::text AS qualified, n.nspname, c.relname
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1)",
            &[&name],
        )
        .await?
        .ok_or_else(|| CatalogError::NoView(name.to_owned()))?;
    let schema: String = row.get("nspname");
    let relname: String = row.get("relname");
    let columns: BTreeMap<String, String> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    match columns.get("data").map(String::as_str) {
        Some("jsonb" | "json") => {}
        _ => {
            let names: Vec<&str> = columns.keys().map(String::as_str).collect();
            return Err(CatalogError::NoDataColumn(
                name.to_owned(),
                names.join(", "),
            ));
        }
    }
    Ok(View {
        sql_name: format!("{}.{}", quote_ident(&schema), quote_ident(&relname)),
        columns,
    })
}

pub async fn function(client: &impl GenericClient, name: &str) -> Result<Function, CatalogError> {
    let (schema, bare) = match name.split_once('.') {
        Some((schema, bare)) => (Some(schema), bare),
        None => (None, name),
    };
    let rows = client
        .query(
            "SELECT n.nspname::text, p.proname::text, p.oid::regprocedure::text AS signature,
                    p.pronargs::int4, p.pronargdefaults::int4,
                    coalesce(p.proargnames, '{}')::text[] AS names,
                    coalesce(p.proargmodes::text[], '{}') AS modes,
                    ARRAY(SELECT format_type(t, NULL)
                          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS u(t, i)
                          ORDER BY i) AS types,
                    p.proretset,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = rt.typrelid AND a.attnum > 0
                            AND NOT a.attisdropped ORDER BY a.attnum) AS result_columns
             FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             JOIN pg_type rt ON rt.oid = p.prorettype
             WHERE p.proname = $1
               AND ($2::text IS NULL AND n.nspname = ANY(current_schemas(false))
                    OR n.nspname = $2::text)",
            &[&bare, &schema],
        )
        .await?;
    let row = match rows.as_slice() {
        [] => return Err(CatalogError::NoFunction(name.to_owned())),
        [one] => one,
        many => {
            let signatures: Vec<String> = many.iter().map(|r| r.get("signature")).collect();
            return Err(CatalogError::Overloaded(
                name.to_owned(),
                signatures.join(", "),
            ));
        }
    };
    let bad = |message: String| CatalogError::BadFunction {
        name: name.to_owned(),
        message,
    };
    let modes: Vec<String> = row.get("modes");
    if modes.iter().any(|m| m != "i") {
        return Err(bad(
            "has OUT, INOUT or VARIADIC parameters; return a mutation_response instead".into(),
        ));
    }
    if row.get::<_, bool>("proretset") {
        return Err(bad(
            "returns a set; a mutation function returns one mutation_response".into(),
        ));
    }
    let result_columns: Vec<String> = row.get("result_columns");
    let response = if result_columns.iter().any(|c| c == "succeeded") {
        ResponseForm::Succeeded
    } else if result_columns.iter().any(|c| c == "status") {
        ResponseForm::Status
    } else {
        return Err(bad(format!(
            "does not return a mutation_response (its result has columns [{}]; expected \
             `status, message, entity_id, …` or `succeeded, state_changed, error_class, …`)",
            result_columns.join(", ")
        )));
    };
    let count = row.get::<_, i32>("pronargs") as usize;
    let defaults = row.get::<_, i32>("pronargdefaults") as usize;
    let names: Vec<String> = row.get("names");
    let types: Vec<String> = row.get("types");
    if names.len() < count || names.iter().take(count).any(String::is_empty) {
        return Err(bad(
            "has unnamed parameters; walstream passes arguments by name".into(),
        ));
    }
    let params = names
        .into_iter()
        .zip(types)
        .take(count)
        .enumerate()
        .map(|(i, (name, sql_type))| Param {
            name,
            sql_type,
            has_default: i >= count - defaults,
        })
        .collect();
    let schema: String = row.get("nspname");
    let proname: String = row.get("proname");
    Ok(Function {
        sql_name: format!("{}.{}", quote_ident(&schema), quote_ident(&proname)),
        params,
        response,
    })
}

/// `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with embedded quotes doubled; only for names from the schema file, never for
/// request values (those are always bound parameters).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
