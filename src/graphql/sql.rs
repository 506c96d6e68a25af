//! SQL for queries and mutations. Only names checked against the schema and the catalog
//! reach the SQL text; every value from a request is a bound parameter.

use std::collections::BTreeMap;

use async_graphql::{Name, Value};
use indexmap::IndexMap;
use tokio_postgres::types::{ToSql, Type};

use super::catalog::{quote_ident, quote_literal, View};
use super::sdl::snake_case;

/// A bound parameter. Every value travels as text and is cast in SQL to the column's or the
/// parameter's type, so PostgreSQL's own input functions validate it.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(Option<String>),
    TextArray(Vec<Option<String>>),
}

impl Param {
    pub fn sql_type(&self) -> Type {
        match self {
            Param::Text(_) => Type::TEXT,
            Param::TextArray(_) => Type::TEXT_ARRAY,
        }
    }

    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(text) => text,
            Param::TextArray(items) => items,
        }
    }
}

/// Comparisons a filterable field offers, by its GraphQL scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// String and ID: every operator, including like/ilike.
    Text,
    /// Int, Float, Decimal, DateTime, UUID and enums: ordering but no pattern matching.
    Ordered,
    /// Boolean and JSON: equality and null tests.
    Equality,
}

impl FilterKind {
    pub fn operators(self) -> &'static [&'static str] {
        match self {
            FilterKind::Text => &[
                "eq", "neq", "in", "nin", "lt", "lte", "gt", "gte", "like", "ilike", "isnull",
            ],
            FilterKind::Ordered => &["eq", "neq", "in", "nin", "lt", "lte", "gt", "gte", "isnull"],
            FilterKind::Equality => &["eq", "neq", "isnull"],
        }
    }
}

/// The SQL type a GraphQL scalar is compared as when it is read from `data`.
pub fn scalar_sql_type(scalar: &str) -> Option<(&'static str, FilterKind)> {
    Some(match scalar {
        "ID" | "String" => ("text", FilterKind::Text),
        "Int" | "Float" | "Decimal" => ("numeric", FilterKind::Ordered),
        "DateTime" => ("timestamptz", FilterKind::Ordered),
        "UUID" => ("uuid", FilterKind::Ordered),
        "Boolean" => ("boolean", FilterKind::Equality),
        "JSON" => ("jsonb", FilterKind::Equality),
        _ => return None,
    })
}

/// How one field of a view's type is read in SQL: a real column of the view when it has one
/// (so indexes apply), otherwise the key in `data`.
#[derive(Debug, Clone)]
pub struct Column {
    pub expr: String,
    pub sql_type: String,
}

impl Column {
    /// `field` of GraphQL scalar (or enum, as text) `scalar` in `view`.
    pub fn for_field(view: &View, field: &str, scalar: &str) -> Column {
        let key = snake_case(field);
        if key != "data" {
            if let Some(sql_type) = view.columns.get(&key) {
                return Column {
                    expr: quote_ident(&key),
                    sql_type: sql_type.clone(),
                };
            }
        }
        let sql_type = scalar_sql_type(scalar).map_or("text", |(t, _)| t);
        let expr = if sql_type == "jsonb" {
            format!("(data->{})", quote_literal(&key))
        } else {
            format!("((data->>{})::{sql_type})", quote_literal(&key))
        };
        Column {
            expr,
            sql_type: sql_type.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("`{0}` expects a list")]
    NotAList(String),
    #[error("`{0}` is not a filterable field")]
    UnknownField(String),
    #[error("`{0}` is not a filter operator")]
    UnknownOperator(String),
    #[error("`{0}` must be an object")]
    NotAnObject(String),
}

/// A SELECT over a view, built up clause by clause.
pub struct Select<'a> {
    columns: &'a BTreeMap<String, Column>,
    pub params: Vec<Param>,
}

impl<'a> Select<'a> {
    pub fn new(columns: &'a BTreeMap<String, Column>) -> Self {
        Self {
            columns,
            params: Vec::new(),
        }
    }

    pub fn bind(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params.len())
    }

    /// A `where` input object as a SQL condition.
    pub fn condition(&mut self, filter: &IndexMap<Name, Value>) -> Result<String, BuildError> {
        let mut parts = Vec::new();
        for (name, value) in filter {
            let part = match name.as_str() {
                "_and" | "_or" => {
                    let items = match value {
                        Value::List(items) => items,
                        Value::Null => continue,
                        _ => return Err(BuildError::NotAList(name.to_string())),
                    };
                    let joiner = if name.as_str() == "_and" {
                        " AND "
                    } else {
                        " OR "
                    };
                    let mut inner = Vec::new();
                    for item in items {
                        inner.push(self.condition(as_object(name, item)?)?);
                    }
                    if inner.is_empty() {
                        (if name.as_str() == "_and" {
                            "TRUE"
                        } else {
                            "FALSE"
                        })
                        .to_owned()
                    } else {
                        format!("({})", inner.join(joiner))
                    }
                }
                "_not" => match value {
                    Value::Null => continue,
                    _ => format!("NOT ({})", self.condition(as_object(name, value)?)?),
                },
                field => {
                    let column = self
                        .columns
                        .get(field)
                        .ok_or_else(|| BuildError::UnknownField(field.to_owned()))?;
                    match value {
                        Value::Null => continue,
                        _ => self.field_condition(field, column, as_object(name, value)?)?,
                    }
                }
            };
            parts.push(part);
        }
        Ok(if parts.is_empty() {
            "TRUE".to_owned()
        } else {
            parts.join(" AND ")
        })
    }

    fn field_condition(
        &mut self,
        field: &str,
        column: &Column,
        ops: &IndexMap<Name, Value>,
    ) -> Result<String, BuildError> {
        let (expr, ty) = (&column.expr, &column.sql_type);
        let mut parts = Vec::new();
        for (op, operand) in ops {
            let label = || format!("{field}.{op}");
            if operand == &Value::Null {
                continue;
            }
            let part = match op.as_str() {
                "isnull" => match operand {
                    Value::Boolean(true) => format!("{expr} IS NULL"),
                    _ => format!("{expr} IS NOT NULL"),
                },
                "in" | "nin" => {
                    let Value::List(items) = operand else {
                        return Err(BuildError::NotAList(label()));
                    };
                    let texts = items.iter().map(value_text).collect();
                    let p = self.bind(Param::TextArray(texts));
                    let any = format!("{expr} = ANY({p}::text[]::{ty}[])");
                    if op.as_str() == "in" {
                        any
                    } else {
                        format!("NOT ({any})")
                    }
                }
                "like" | "ilike" => {
                    let p = self.bind(Param::Text(value_text(operand)));
                    let keyword = if op.as_str() == "like" {
                        "LIKE"
                    } else {
                        "ILIKE"
                    };
                    format!("{expr}::text {keyword} {p}")
                }
                comparison => {
                    let sql_op = match comparison {
                        "eq" => "=",
                        "neq" => "IS DISTINCT FROM",
                        "lt" => "<",
                        "lte" => "<=",
                        "gt" => ">",
                        "gte" => ">=",
                        other => return Err(BuildError::UnknownOperator(other.to_owned())),
                    };
                    let p = self.bind(Param::Text(value_text(operand)));
                    format!("{expr} {sql_op} {p}::text::{ty}")
                }
            };
            parts.push(part);
        }
        Ok(if parts.is_empty() {
            "TRUE".to_owned()
        } else {
            format!("({})", parts.join(" AND "))
        })
    }

    /// `orderBy: [{status: ASC}, {createdAt: DESC}]` as an ORDER BY list.
    pub fn order_by(&self, order: &[Value]) -> Result<Vec<String>, BuildError> {
        let mut terms = Vec::new();
        for item in order {
            for (field, direction) in as_object(&Name::new("orderBy"), item)? {
                let column = self
                    .columns
                    .get(field.as_str())
                    .ok_or_else(|| BuildError::UnknownField(field.to_string()))?;
                let direction = match direction {
                    Value::Enum(d) if d.as_str() == "DESC" => "DESC NULLS LAST",
                    Value::Null => continue,
                    _ => "ASC NULLS LAST",
                };
                terms.push(format!("{} {direction}", column.expr));
            }
        }
        Ok(terms)
    }
}

fn as_object<'v>(name: &Name, value: &'v Value) -> Result<&'v IndexMap<Name, Value>, BuildError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(BuildError::NotAnObject(name.to_string())),
    }
}

/// A request value as the text PostgreSQL's input function for the target type reads.
pub fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        Value::Enum(e) => Some(e.to_string()),
        other => Some(
            other
                .clone()
                .into_json()
                .map(|j| j.to_string())
                .unwrap_or_default(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View {
            sql_name: "\"public\".\"v_order\"".into(),
            columns: [("id", "uuid"), ("data", "jsonb"), ("fk_user", "bigint")]
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect(),
        }
    }

    fn columns() -> BTreeMap<String, Column> {
        let view = view();
        [
            ("id", "ID"),
            ("status", "String"),
            ("total", "Decimal"),
            ("createdAt", "DateTime"),
        ]
        .into_iter()
        .map(|(f, s)| (f.to_owned(), Column::for_field(&view, f, s)))
        .collect()
    }

    fn filter(json: serde_json::Value) -> IndexMap<Name, Value> {
        match Value::from_json(json).expect("valid") {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn real_columns_are_used_and_data_keys_are_cast() {
        let columns = columns();
        assert_eq!(columns["id"].expr, "\"id\"");
        assert_eq!(columns["id"].sql_type, "uuid");
        assert_eq!(columns["total"].expr, "((data->>'total')::numeric)");
        assert_eq!(
            columns["createdAt"].expr,
            "((data->>'created_at')::timestamptz)"
        );
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let columns = columns();
        let mut select = Select::new(&columns);
        let hostile = "x'); DROP TABLE tb_order; --";
        let condition = select
            .condition(&filter(serde_json::json!({
                "status": {"eq": hostile, "in": ["a", hostile]},
                "_or": [{"total": {"gte": "10.5"}}, {"createdAt": {"isnull": true}}],
                "_not": {"id": {"neq": "3f1c…"}}
            })))
            .expect("valid");
        assert!(!condition.contains("DROP"), "{condition}");
        // serde_json objects iterate in key order: _not, _or, status.
        assert_eq!(
            condition,
            "NOT ((\"id\" IS DISTINCT FROM $1::text::uuid)) \
             AND ((((data->>'total')::numeric) >= $2::text::numeric) OR (((data->>'created_at')::timestamptz) IS NULL)) \
             AND (((data->>'status')::text) = $3::text::text AND ((data->>'status')::text) = ANY($4::text[]::text[]))"
        );
        assert_eq!(select.params[2], Param::Text(Some(hostile.into())));
        assert_eq!(select.params.len(), 4);
    }

    #[test]
    fn unknown_fields_and_null_operands_are_refused() {
        let columns = columns();
        let mut select = Select::new(&columns);
        assert_eq!(
            select.condition(&filter(serde_json::json!({"password": {"eq": "x"}}))),
            Err(BuildError::UnknownField("password".into()))
        );
        assert_eq!(
            select.condition(&filter(serde_json::json!({"status": {"drop": "x"}}))),
            Err(BuildError::UnknownOperator("drop".into()))
        );
        let order = vec![Value::from_json(serde_json::json!({"nope": "ASC"})).expect("valid")];
        assert_eq!(
            select.order_by(&order),
            Err(BuildError::UnknownField("nope".into()))
        );
    }
}
