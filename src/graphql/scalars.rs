//! The one table of GraphQL scalars, GraphQL's own and walstream's (`Decimal`, `DateTime`,
//! `UUID`, `JSON`): what a view's JSON becomes as output and which JSON a variable may hold.
//! The executor and the compiled plans both read it, so they cannot disagree.

use async_graphql::dynamic;
use async_graphql::{Name, Value};
use serde_json::{Number, Value as Json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Id,
    String,
    Int,
    Float,
    Boolean,
    Decimal,
    DateTime,
    Uuid,
    Json,
}

/// A scalar's output, before it is either an executor value or bytes of a compiled response.
#[derive(Debug, PartialEq)]
pub enum Output<'a> {
    Int(i64),
    Float(&'a Number),
    Boolean(bool),
    Text(std::borrow::Cow<'a, str>),
    Json(&'a Json),
}

impl Scalar {
    pub const ALL: [Scalar; 9] = [
        Scalar::Id,
        Scalar::String,
        Scalar::Int,
        Scalar::Float,
        Scalar::Boolean,
        Scalar::Decimal,
        Scalar::DateTime,
        Scalar::Uuid,
        Scalar::Json,
    ];

    pub fn named(name: &str) -> Option<Scalar> {
        Self::ALL.into_iter().find(|scalar| scalar.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Scalar::Id => "ID",
            Scalar::String => "String",
            Scalar::Int => "Int",
            Scalar::Float => "Float",
            Scalar::Boolean => "Boolean",
            Scalar::Decimal => "Decimal",
            Scalar::DateTime => "DateTime",
            Scalar::Uuid => "UUID",
            Scalar::Json => "JSON",
        }
    }

    /// walstream's scalars, which the schema registers (GraphQL's own are built in).
    fn description(self) -> Option<&'static str> {
        match self {
            Scalar::Decimal => Some("An exact decimal number, written as a string (\"49.99\")"),
            Scalar::DateTime => Some("An RFC 3339 timestamp"),
            Scalar::Uuid => Some("A UUID (\"3f1c2a9e-8b7d-4c6e-9f0a-1b2c3d4e5f60\")"),
            Scalar::Json => Some("Any JSON value"),
            _ => None,
        }
    }

    /// A view's JSON value as this scalar's output; `None` when the value does not fit.
    pub fn output(self, value: &Json) -> Option<Output<'_>> {
        use std::borrow::Cow::{Borrowed, Owned};
        Some(match (self, value) {
            (Scalar::Int, Json::Number(n)) => Output::Int(n.as_i64()?),
            (Scalar::Float, Json::Number(n)) => Output::Float(n),
            (Scalar::Boolean, Json::Bool(b)) => Output::Boolean(*b),
            // Decimals stay exact: the number's text, never a float.
            (Scalar::Decimal, Json::Number(n)) => Output::Text(Owned(n.to_string())),
            (Scalar::Json, _) => Output::Json(value),
            (
                Scalar::Id | Scalar::String | Scalar::Decimal | Scalar::DateTime | Scalar::Uuid,
                Json::String(s),
            ) => Output::Text(Borrowed(s)),
            (Scalar::Id | Scalar::String, Json::Number(n)) => Output::Text(Owned(n.to_string())),
            (Scalar::String, other) => Output::Text(Owned(other.to_string())),
            _ => return None,
        })
    }

    /// Whether a variable of this scalar may hold `json`: what the executor refuses, this
    /// refuses.
    pub fn accepts(self, json: &Json) -> bool {
        match (self, json) {
            (_, Json::Null) | (Scalar::Json, _) => true,
            (Scalar::Id | Scalar::String, Json::String(_)) => true,
            (Scalar::Id, Json::Number(n)) => n.is_i64() || n.is_u64(),
            (Scalar::Int, Json::Number(n)) => n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
            (Scalar::Float | Scalar::Decimal, Json::Number(_)) => true,
            (Scalar::Boolean, Json::Bool(_)) => true,
            (Scalar::Decimal, Json::String(s)) => is_decimal(s),
            (Scalar::DateTime, Json::String(s)) => is_date_time(s),
            (Scalar::Uuid, Json::String(s)) => is_uuid(s),
            _ => false,
        }
    }

    /// A variable's JSON as the executor takes it (an integer given for an ID is its text);
    /// `None` when this scalar does not accept it.
    pub fn input(self, json: &Json) -> Option<Value> {
        if !self.accepts(json) {
            return None;
        }
        match (self, json) {
            (Scalar::Id, Json::Number(n)) => Some(Value::String(n.to_string())),
            _ => Value::from_json(json.clone()).ok(),
        }
    }
}

impl Output<'_> {
    /// As the executor's resolvers return it.
    pub fn into_value(self) -> Result<Value, String> {
        Ok(match self {
            Output::Int(i) => Value::Number(i.into()),
            Output::Float(n) => Value::Number(n.clone()),
            Output::Boolean(b) => Value::Boolean(b),
            Output::Text(text) => Value::String(text.into_owned()),
            Output::Json(json) => Value::from_json(json.clone()).map_err(|e| e.to_string())?,
        })
    }

    /// As JSON text in a compiled response.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            Output::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Output::Float(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Output::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Output::Text(text) => serde_json::to_writer(&mut *out, text.as_ref())?,
            Output::Json(json) => serde_json::to_writer(&mut *out, json)?,
        }
        Ok(())
    }
}

/// Registers walstream's scalars, each refusing as input what [`Scalar::accepts`] refuses.
pub fn register(mut builder: dynamic::SchemaBuilder) -> dynamic::SchemaBuilder {
    for scalar in Scalar::ALL {
        let Some(description) = scalar.description() else {
            continue;
        };
        let mut registered = dynamic::Scalar::new(scalar.name()).description(description);
        if scalar != Scalar::Json {
            registered = registered.validator(move |value| {
                value
                    .clone()
                    .into_json()
                    .is_ok_and(|json| !json.is_null() && scalar.accepts(&json))
            });
        }
        builder = builder.register(registered);
    }
    builder
}

/// An enum value's output: its name.
pub fn enum_value(text: &str) -> Value {
    Value::Enum(Name::new(text))
}

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    !whole.is_empty()
        && !fraction.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_date_time(text: &str) -> bool {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn walstreams_scalars_check_their_text() {
        assert!(is_decimal("49.99") && is_decimal("-1") && is_decimal("0.5"));
        assert!(!is_decimal("4e5") && !is_decimal("abc") && !is_decimal("1.") && !is_decimal(""));
        assert!(is_uuid("3f1c2a9e-8b7d-4c6e-9f0a-1b2c3d4e5f60"));
        assert!(!is_uuid("3f1c2a9e8b7d4c6e9f0a1b2c3d4e5f60xxxx"));
        assert!(Scalar::DateTime.accepts(&json!("2026-11-22T10:00:00Z")));
        assert!(!Scalar::DateTime.accepts(&json!("yesterday")));
    }

    #[test]
    fn decimals_stay_exact() {
        let decimal: Json = serde_json::from_str("12345678901234567.89").expect("json");
        let output = Scalar::Decimal.output(&decimal).expect("fits");
        assert_eq!(
            output.into_value(),
            Ok(Value::String("12345678901234567.89".into()))
        );
    }

    /// The two renderings of one output agree: the compiled path writes what the executor
    /// returns, for every scalar and every kind of value.
    #[test]
    fn written_output_is_the_executors_value() {
        let values = [
            json!(42),
            json!(-7),
            json!(1.5),
            json!(12345678901234_i64),
            json!("49.99"),
            json!("text \"quoted\" \u{e9}"),
            json!(true),
            json!({"b": 1, "a": [1, "x"]}),
            json!([1, 2]),
            json!("2026-11-22T10:00:00Z"),
        ];
        for scalar in Scalar::ALL {
            for value in &values {
                let Some(output) = scalar.output(value) else {
                    continue;
                };
                let mut written = Vec::new();
                output.write(&mut written).expect("writes");
                let written: Json = serde_json::from_slice(&written).expect("valid JSON");
                let executed = output
                    .into_value()
                    .expect("a value")
                    .into_json()
                    .expect("JSON");
                assert_eq!(written, executed, "{} from {value}", scalar.name());
            }
        }
        assert_eq!(Scalar::Int.output(&json!("x")), None);
    }

    #[test]
    fn inputs_are_refused_as_the_executor_refuses_them() {
        assert_eq!(Scalar::Id.input(&json!(7)), Some(Value::String("7".into())));
        assert_eq!(Scalar::Int.input(&json!(1_i64 << 40)), None);
        assert_eq!(Scalar::Uuid.input(&json!("nope")), None);
        assert!(Scalar::Decimal.input(&json!(1.5)).is_some());
        assert!(Scalar::Boolean.input(&json!(null)).is_some());
    }
}
