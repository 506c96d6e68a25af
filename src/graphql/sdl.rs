//! `schema.graphql`: the SDL with walstream's directives, read into a model of views,
//! functions and change feeds. Every error names the line and the object.

use std::collections::BTreeMap;

use async_graphql::parser::types::{
    BaseType, ConstDirective, FieldDefinition, InputValueDefinition, Type, TypeKind,
    TypeSystemDefinition,
};
use async_graphql::parser::{parse_schema, Positioned};
use async_graphql::Value as ConstValue;

use super::scalars::Scalar;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SdlError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// A GraphQL type expression: `[Order!]!`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeExpr {
    Named { name: String, nullable: bool },
    List { item: Box<TypeExpr>, nullable: bool },
}

impl TypeExpr {
    pub fn from_parsed(ty: &Type) -> Self {
        match &ty.base {
            BaseType::Named(name) => TypeExpr::Named {
                name: name.to_string(),
                nullable: ty.nullable,
            },
            BaseType::List(item) => TypeExpr::List {
                item: Box::new(TypeExpr::from_parsed(item)),
                nullable: ty.nullable,
            },
        }
    }

    /// The named type inside any lists.
    pub fn base_name(&self) -> &str {
        match self {
            TypeExpr::Named { name, .. } => name,
            TypeExpr::List { item, .. } => item.base_name(),
        }
    }

    pub fn is_list(&self) -> bool {
        matches!(self, TypeExpr::List { .. })
    }

    pub fn is_nullable(&self) -> bool {
        match self {
            TypeExpr::Named { nullable, .. } | TypeExpr::List { nullable, .. } => *nullable,
        }
    }
}

impl std::fmt::Display for TypeExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (nullable, written) = match self {
            TypeExpr::Named { name, nullable } => (*nullable, name.clone()),
            TypeExpr::List { item, nullable } => (*nullable, format!("[{item}]")),
        };
        write!(f, "{written}{}", if nullable { "" } else { "!" })
    }
}

#[derive(Debug, Clone)]
pub struct FieldDef {
    pub name: String,
    pub ty: TypeExpr,
    pub description: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct ArgDef {
    pub name: String,
    pub ty: TypeExpr,
    pub default: Option<serde_json::Value>,
    /// The event data key a subscription argument filters on (`@filter(key:)`).
    pub filter_key: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct ObjectDef {
    pub name: String,
    pub description: Option<String>,
    /// The view this type is read from by default (`@view` on the type).
    pub view: Option<String>,
    pub fields: Vec<FieldDef>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct InputDef {
    pub name: String,
    pub fields: Vec<ArgDef>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct EnumDef {
    pub name: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QueryDef {
    pub name: String,
    pub description: Option<String>,
    pub args: Vec<ArgDef>,
    pub ty: TypeExpr,
    pub view: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct MutationDef {
    pub name: String,
    pub description: Option<String>,
    pub args: Vec<ArgDef>,
    pub ty: TypeExpr,
    pub function: String,
    /// Function parameter → JWT claim that supplies it.
    pub claims: BTreeMap<String, String>,
    pub line: usize,
}

/// Which change events feed a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSource {
    /// A NATS subject pattern (`events.order.status_updated`, `fraiseql.mutation.Order.*`).
    Subject(String),
    /// An entity and the operations wanted (empty: all).
    Entity { entity: String, events: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct SubscriptionDef {
    pub name: String,
    pub description: Option<String>,
    pub args: Vec<ArgDef>,
    pub ty: TypeExpr,
    pub source: EventSource,
    /// The event data key that identifies the row in the type's view.
    pub key: String,
    pub line: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Sdl {
    pub objects: BTreeMap<String, ObjectDef>,
    pub inputs: BTreeMap<String, InputDef>,
    pub enums: BTreeMap<String, EnumDef>,
    pub queries: Vec<QueryDef>,
    pub mutations: Vec<MutationDef>,
    pub subscriptions: Vec<SubscriptionDef>,
}

/// Parses and checks an SDL document; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Sdl, SdlError> {
    let error = |line: usize, message: String| SdlError {
        file: file.to_owned(),
        line,
        message,
    };
    let document = parse_schema(text).map_err(|e| {
        let line = e.positions().next().map(|p| p.line).unwrap_or(1);
        error(line, format!("syntax error: {e}"))
    })?;
    let mut roots = (
        "Query".to_owned(),
        "Mutation".to_owned(),
        "Subscription".to_owned(),
    );
    for definition in &document.definitions {
        if let TypeSystemDefinition::Schema(schema) = definition {
            let s = &schema.node;
            if let Some(q) = &s.query {
                roots.0 = q.node.to_string();
            }
            if let Some(m) = &s.mutation {
                roots.1 = m.node.to_string();
            }
            if let Some(sub) = &s.subscription {
                roots.2 = sub.node.to_string();
            }
        }
    }
    let mut sdl = Sdl::default();
    let mut root_fields: Vec<(String, Positioned<FieldDefinition>)> = Vec::new();
    for definition in document.definitions {
        let TypeSystemDefinition::Type(ty) = definition else {
            continue;
        };
        // The name's line, not the definition's: a description comes before the name.
        let line = ty.node.name.pos.line;
        let ty = ty.node;
        let name = ty.name.node.to_string();
        if Scalar::named(name.as_str()).is_some() {
            return Err(error(
                line,
                format!("`{name}` is a built-in scalar and cannot be redefined"),
            ));
        }
        match ty.kind {
            TypeKind::Object(object) if [&roots.0, &roots.1, &roots.2].contains(&&name) => {
                root_fields.extend(object.fields.into_iter().map(|f| (name.clone(), f)));
            }
            TypeKind::Object(object) => {
                let view = string_argument(&ty.directives, "view", "name")
                    .map_err(|m| error(line, format!("type {name}: {m}")))?;
                let fields = object
                    .fields
                    .into_iter()
                    .map(|f| FieldDef {
                        name: f.node.name.node.to_string(),
                        ty: TypeExpr::from_parsed(&f.node.ty.node),
                        description: f.node.description.map(|d| d.node),
                        line: f.node.name.pos.line,
                    })
                    .collect();
                let object = ObjectDef {
                    name: name.clone(),
                    description: ty.description.map(|d| d.node),
                    view,
                    fields,
                    line,
                };
                if sdl.objects.insert(name.clone(), object).is_some() {
                    return Err(error(line, format!("type {name} is defined twice")));
                }
            }
            TypeKind::InputObject(input) => {
                let fields = input
                    .fields
                    .iter()
                    .map(|f| arg_def(f, file))
                    .collect::<Result<_, _>>()?;
                sdl.inputs
                    .insert(name.clone(), InputDef { name, fields, line });
            }
            TypeKind::Enum(e) => {
                let values = e
                    .values
                    .iter()
                    .map(|v| v.node.value.node.to_string())
                    .collect();
                sdl.enums.insert(name.clone(), EnumDef { name, values });
            }
            TypeKind::Scalar => {
                return Err(error(
                    line,
                    format!(
                        "custom scalar `{name}` is not supported; use one of {}",
                        Scalar::ALL.map(Scalar::name).join(", ")
                    ),
                ))
            }
            TypeKind::Interface(_) | TypeKind::Union(_) => {
                return Err(error(
                    line,
                    format!("`{name}`: interfaces and unions are not supported yet"),
                ))
            }
        }
    }
    for (root, field) in root_fields {
        let line = field.node.name.pos.line;
        let field = field.node;
        if root == roots.0 {
            sdl.queries.push(query_def(&sdl, field, line, file)?);
        } else if root == roots.1 {
            sdl.mutations.push(mutation_def(field, line, file)?);
        } else {
            sdl.subscriptions.push(subscription_def(field, line, file)?);
        }
    }
    check_references(&sdl, file)?;
    Ok(sdl)
}

fn query_def(
    sdl: &Sdl,
    field: FieldDefinition,
    line: usize,
    file: &str,
) -> Result<QueryDef, SdlError> {
    let name = field.name.node.to_string();
    let ty = TypeExpr::from_parsed(&field.ty.node);
    let own_view = string_argument(&field.directives, "view", "name").map_err(|m| SdlError {
        file: file.into(),
        line,
        message: format!("query {name}: {m}"),
    })?;
    let type_view = sdl.objects.get(ty.base_name()).and_then(|o| o.view.clone());
    let view = own_view.or(type_view).ok_or_else(|| SdlError {
        file: file.into(),
        line,
        message: format!(
            "query {name}: no view to read from; add @view(name: \"v_…\") to the field or to type {}",
            ty.base_name()
        ),
    })?;
    Ok(QueryDef {
        name,
        description: field.description.map(|d| d.node),
        args: arg_defs(&field.arguments, file)?,
        ty,
        view,
        line,
    })
}

fn mutation_def(field: FieldDefinition, line: usize, file: &str) -> Result<MutationDef, SdlError> {
    let name = field.name.node.to_string();
    let error = |message: String| SdlError {
        file: file.into(),
        line,
        message: format!("mutation {name}: {message}"),
    };
    let function = string_argument(&field.directives, "function", "name")
        .map_err(&error)?
        .ok_or_else(|| error("no @function(name: \"fn_…\") to call".into()))?;
    let mut claims = BTreeMap::new();
    if let Some(value) = argument(&field.directives, "function", "claims") {
        let ConstValue::Object(map) = value else {
            return Err(error(
                "@function(claims:) must be an object such as {p_fk_user: \"user_pk\"}".into(),
            ));
        };
        for (param, claim) in map {
            let ConstValue::String(claim) = claim else {
                return Err(error(format!(
                    "@function(claims:): `{param}` must name a claim as a string"
                )));
            };
            claims.insert(param.to_string(), claim.clone());
        }
    }
    Ok(MutationDef {
        description: field.description.map(|d| d.node),
        args: arg_defs(&field.arguments, file)?,
        ty: TypeExpr::from_parsed(&field.ty.node),
        function,
        claims,
        line,
        name,
    })
}

fn subscription_def(
    field: FieldDefinition,
    line: usize,
    file: &str,
) -> Result<SubscriptionDef, SdlError> {
    let name = field.name.node.to_string();
    let error = |message: String| SdlError {
        file: file.into(),
        line,
        message: format!("subscription {name}: {message}"),
    };
    let subject = string_argument(&field.directives, "subscribe", "subject").map_err(&error)?;
    let entity = string_argument(&field.directives, "subscribe", "entity").map_err(&error)?;
    let key = string_argument(&field.directives, "subscribe", "key")
        .map_err(&error)?
        .unwrap_or_else(|| "id".into());
    let events = match argument(&field.directives, "subscribe", "events") {
        None => Vec::new(),
        Some(ConstValue::List(items)) => items
            .iter()
            .map(|item| match item {
                ConstValue::String(s) => Ok(s.to_ascii_uppercase()),
                ConstValue::Enum(e) => Ok(e.to_string().to_ascii_uppercase()),
                other => Err(error(format!(
                    "@subscribe(events:) has `{other}`, not an event name"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(error(format!(
                "@subscribe(events:) must be a list, not `{other}`"
            )))
        }
    };
    for event in &events {
        if !["INSERT", "UPDATE", "DELETE"].contains(&event.as_str()) {
            return Err(error(format!(
                "@subscribe(events:) has `{event}`; use INSERT, UPDATE or DELETE"
            )));
        }
    }
    let source = match (subject, entity) {
        (Some(subject), None) if events.is_empty() => EventSource::Subject(subject),
        (None, Some(entity)) => EventSource::Entity { entity, events },
        _ => {
            return Err(error(
                "needs @subscribe(subject: \"…\") or @subscribe(entity: \"Order\", events: [\"UPDATE\"]), \
                 exactly one of them"
                    .into(),
            ))
        }
    };
    Ok(SubscriptionDef {
        description: field.description.map(|d| d.node),
        args: arg_defs(&field.arguments, file)?,
        ty: TypeExpr::from_parsed(&field.ty.node),
        source,
        key,
        line,
        name,
    })
}

fn arg_defs(
    args: &[Positioned<InputValueDefinition>],
    file: &str,
) -> Result<Vec<ArgDef>, SdlError> {
    args.iter().map(|a| arg_def(a, file)).collect()
}

fn arg_def(arg: &Positioned<InputValueDefinition>, file: &str) -> Result<ArgDef, SdlError> {
    let line = arg.node.name.pos.line;
    let arg = &arg.node;
    let name = arg.name.node.to_string();
    let filter_key = string_argument(&arg.directives, "filter", "key").map_err(|m| SdlError {
        file: file.into(),
        line,
        message: format!("argument {name}: {m}"),
    })?;
    let default = match &arg.default_value {
        Some(v) => Some(v.node.clone().into_json().map_err(|e| SdlError {
            file: file.into(),
            line,
            message: format!("argument {name}: default value: {e}"),
        })?),
        None => None,
    };
    Ok(ArgDef {
        name,
        ty: TypeExpr::from_parsed(&arg.ty.node),
        default,
        filter_key,
        line,
    })
}

fn argument<'a>(
    directives: &'a [Positioned<ConstDirective>],
    directive: &str,
    name: &str,
) -> Option<&'a ConstValue> {
    directives
        .iter()
        .find(|d| d.node.name.node.as_str() == directive)
        .and_then(|d| d.node.get_argument(name))
        .map(|v| &v.node)
}

fn string_argument(
    directives: &[Positioned<ConstDirective>],
    directive: &str,
    name: &str,
) -> Result<Option<String>, String> {
    match argument(directives, directive, name) {
        None => Ok(None),
        Some(ConstValue::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "@{directive}({name}:) must be a non-empty string, not `{other}`"
        )),
    }
}

/// Every type named anywhere exists, and each kind of field uses the kinds of types it can.
fn check_references(sdl: &Sdl, file: &str) -> Result<(), SdlError> {
    let error = |line: usize, message: String| SdlError {
        file: file.into(),
        line,
        message,
    };
    let is_output = |name: &str| {
        Scalar::named(name).is_some()
            || sdl.objects.contains_key(name)
            || sdl.enums.contains_key(name)
    };
    // `<Type>Where`, `<Type>OrderBy` and `SortDirection` are generated for list queries and
    // may be named in arguments.
    let is_generated = |name: &str| {
        name == "SortDirection"
            || ["Where", "OrderBy"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|object| sdl.objects.contains_key(object))
            })
    };
    let is_input = |name: &str| {
        Scalar::named(name).is_some()
            || sdl.inputs.contains_key(name)
            || sdl.enums.contains_key(name)
            || is_generated(name)
    };
    for object in sdl.objects.values() {
        for field in &object.fields {
            if !is_output(field.ty.base_name()) {
                return Err(error(
                    field.line,
                    format!(
                        "{}.{}: unknown type `{}`",
                        object.name,
                        field.name,
                        field.ty.base_name()
                    ),
                ));
            }
        }
    }
    for input in sdl.inputs.values() {
        for field in &input.fields {
            if !is_input(field.ty.base_name()) {
                return Err(error(
                    field.line,
                    format!(
                        "input {}.{}: unknown input type `{}`",
                        input.name,
                        field.name,
                        field.ty.base_name()
                    ),
                ));
            }
        }
    }
    let roots = sdl
        .queries
        .iter()
        .map(|q| ("query", &q.name, &q.ty, &q.args, q.line))
        .chain(
            sdl.mutations
                .iter()
                .map(|m| ("mutation", &m.name, &m.ty, &m.args, m.line)),
        )
        .chain(
            sdl.subscriptions
                .iter()
                .map(|s| ("subscription", &s.name, &s.ty, &s.args, s.line)),
        );
    for (kind, name, ty, args, line) in roots {
        if !sdl.objects.contains_key(ty.base_name()) {
            return Err(error(
                line,
                format!(
                    "{kind} {name}: returns `{}`, which is not an object type defined here",
                    ty.base_name()
                ),
            ));
        }
        for arg in args {
            if !is_input(arg.ty.base_name()) {
                return Err(error(
                    arg.line,
                    format!(
                        "{kind} {name}: argument {}: unknown input type `{}`",
                        arg.name,
                        arg.ty.base_name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `createdAt` → `created_at`, the key FraiseQL views use in `data` and the parameter suffix
/// of SQL functions.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped beside `sql/example/schema.sql`.
    const ORDERS: &str = include_str!("../../sql/example/schema.graphql");

    #[test]
    fn reads_views_functions_and_feeds() {
        let sdl = parse(ORDERS, "schema.graphql").expect("valid");
        assert_eq!(sdl.objects["Order"].view.as_deref(), Some("v_order"));
        assert_eq!(sdl.queries.len(), 2);
        assert_eq!(sdl.queries[1].view, "v_order");
        assert!(sdl.queries[1].ty.is_list());
        assert_eq!(sdl.queries[1].args[0].default, Some(serde_json::json!(20)));
        let create = &sdl.mutations[0];
        assert_eq!(create.function, "fn_create_order");
        assert_eq!(create.claims["p_fk_user"], "user_pk");
        let sub = &sdl.subscriptions[0];
        assert_eq!(
            sub.source,
            EventSource::Entity {
                entity: "Order".into(),
                events: vec!["UPDATE".into()]
            }
        );
        assert_eq!(sub.args[0].filter_key.as_deref(), Some("id"));
        assert_eq!(sub.key, "id");

        let by_subject = ORDERS.replace(
            "@subscribe(entity: \"Order\", events: [\"UPDATE\"])",
            "@subscribe(subject: \"events.order.status_updated\")",
        );
        let sdl = parse(&by_subject, "schema.graphql").expect("valid");
        assert_eq!(
            sdl.subscriptions[0].source,
            EventSource::Subject("events.order.status_updated".into())
        );
    }

    fn error_of(text: &str) -> String {
        parse(text, "s.graphql").expect_err("must fail").to_string()
    }

    #[test]
    fn errors_name_the_line_and_the_object() {
        let missing_view = "type Order { id: ID! }\ntype Query {\n  order(id: ID!): Order\n}";
        let message = error_of(missing_view);
        assert!(
            message.starts_with("s.graphql:3: query order: no view"),
            "{message}"
        );

        let unknown = "type Order @view(name: \"v\") {\n  id: ID!\n  owner: User\n}";
        assert!(error_of(unknown).starts_with("s.graphql:3: Order.owner: unknown type `User`"));

        let syntax = "type Order {\n  id: ID!\n";
        assert!(
            error_of(syntax).contains("syntax error"),
            "{}",
            error_of(syntax)
        );

        let no_function = "type O @view(name: \"v\") { id: ID! }\ntype Mutation {\n  make: O\n}";
        assert!(error_of(no_function).starts_with("s.graphql:3: mutation make: no @function"));

        let two_sources = "type O @view(name: \"v\") { id: ID! }\ntype Subscription {\n  s: O @subscribe(subject: \"a\", entity: \"O\")\n}";
        assert!(error_of(two_sources).contains("exactly one of them"));

        let bad_event = "type O @view(name: \"v\") { id: ID! }\ntype Subscription {\n  s: O @subscribe(entity: \"O\", events: [\"UPSERT\"])\n}";
        assert!(error_of(bad_event).contains("`UPSERT`"));
    }

    #[test]
    fn snake_case_matches_fraiseql_keys() {
        assert_eq!(snake_case("createdAt"), "created_at");
        assert_eq!(snake_case("orderId"), "order_id");
        assert_eq!(snake_case("id"), "id");
        assert_eq!(snake_case("total"), "total");
    }
}
