//! The executable schema: SDL types become async-graphql dynamic types whose resolvers read
//! views, call functions and follow the change feed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_graphql::dynamic::{
    Enum, Field, FieldFuture, FieldValue, InputObject, InputValue, Object, Schema, SchemaBuilder,
    Subscription, SubscriptionField, SubscriptionFieldFuture, TypeRef,
};
use async_graphql::{ErrorExtensions, Value};
use futures::StreamExt;
use tokio_postgres::GenericClient;

use super::auth::Identity;
use super::catalog::{self, quote_ident, Function, View};
use super::db::{client_error, Database, Statement};
use super::feed::{format_cursor, parse_cursor, Feed};
use super::mutation::{interpret, Outcome};
use super::scalars::{self, Scalar};
use super::sdl::{
    snake_case, ArgDef, EventSource, InputDef, MutationDef, ObjectDef, QueryDef, Sdl, SdlError,
    SubscriptionDef, TypeExpr,
};
use super::sql::{scalar_sql_type, value_text, Column, FilterKind, Param, Select};
use crate::config::GraphqlConfig;
use crate::pipeline::event::Position;

/// What resolvers share: the database, the change feed and the paging limits.
pub struct Runtime {
    pub db: Database,
    pub feed: Option<Feed>,
    pub default_limit: i64,
    pub max_limit: i64,
}

/// How a named type is used in output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Scalar,
    Enum,
    Object,
    Input,
}

type Kinds = BTreeMap<String, Kind>;

/// Shared by every field resolver.
type SharedKinds = Arc<Kinds>;

/// A view read as one object type: how each of the type's fields is reached in SQL.
struct Table {
    view: View,
    columns: BTreeMap<String, Column>,
}

impl Table {
    fn new(view: View, object: &ObjectDef, kinds: &Kinds) -> Self {
        let columns = object
            .fields
            .iter()
            .filter(|f| {
                !f.ty.is_list()
                    && matches!(kinds.get(f.ty.base_name()), Some(Kind::Scalar | Kind::Enum))
            })
            .map(|f| {
                (
                    f.name.clone(),
                    Column::for_field(&view, &f.name, f.ty.base_name()),
                )
            })
            .collect();
        Self { view, columns }
    }

    fn select_sql(&self, condition: &str) -> String {
        format!(
            "SELECT data::text FROM {} WHERE {condition}",
            self.view.sql_name
        )
    }
}

/// Builds the schema, checking every view and function against the database.
pub async fn build(
    sdl: &Sdl,
    file: &str,
    config: &GraphqlConfig,
    client: &impl GenericClient,
    runtime: Arc<Runtime>,
) -> anyhow::Result<(Schema, ReadCatalog)> {
    let error = |line: usize, message: String| SdlError {
        file: file.to_owned(),
        line,
        message,
    };
    let kinds = kinds(sdl);
    let mut views: BTreeMap<String, View> = BTreeMap::new();
    let mut view_names: Vec<(String, usize, String)> = sdl
        .objects
        .values()
        .filter_map(|o| {
            o.view
                .clone()
                .map(|v| (v, o.line, format!("type {}", o.name)))
        })
        .collect();
    view_names.extend(
        sdl.queries
            .iter()
            .map(|q| (q.view.clone(), q.line, format!("query {}", q.name))),
    );
    for (name, line, owner) in view_names {
        if views.contains_key(&name) {
            continue;
        }
        let view = catalog::view(client, &name)
            .await
            .map_err(|e| error(line, format!("{owner}: {e}")))?;
        views.insert(name, view);
    }

    let shared_kinds: SharedKinds = Arc::new(kinds.clone());
    let subscribed: BTreeSet<&str> = sdl.subscriptions.iter().map(|s| s.ty.base_name()).collect();
    let mut builder = Schema::build(
        "Query",
        (!sdl.mutations.is_empty()).then_some("Mutation"),
        (!sdl.subscriptions.is_empty()).then_some("Subscription"),
    );
    builder = scalars::register(builder);
    for object in sdl.objects.values() {
        builder = builder.register(object_type(
            object,
            &shared_kinds,
            subscribed.contains(object.name.as_str()),
        ));
    }
    for e in sdl.enums.values() {
        builder = builder.register(Enum::new(&e.name).items(e.values.iter().map(String::as_str)));
    }
    for input in sdl.inputs.values() {
        let mut object = InputObject::new(&input.name);
        for field in &input.fields {
            object = object.field(input_value(field));
        }
        builder = builder.register(object);
    }

    let mut filtered_types = BTreeSet::new();
    let mut reads = HashMap::new();
    let mut query = Object::new("Query");
    for def in &sdl.queries {
        let object = &sdl.objects[def.ty.base_name()];
        let table = Arc::new(Table::new(views[&def.view].clone(), object, &kinds));
        for arg in &def.args {
            if !is_paging_arg(def, &arg.name) && !table.columns.contains_key(&arg.name) {
                return Err(error(
                    arg.line,
                    format!(
                        "query {}: argument `{}` is not a scalar field of {}, so it cannot filter it",
                        def.name, arg.name, object.name
                    ),
                )
                .into());
            }
        }
        if def.ty.is_list() {
            filtered_types.insert(object.name.clone());
        }
        let read = Arc::new(QueryRead::new(def, table));
        reads.insert(def.name.clone(), read.clone());
        query = query.field(query_field(def, read));
    }
    if sdl.queries.is_empty() {
        return Err(error(
            1,
            "the schema has no Query type with at least one field".into(),
        )
        .into());
    }
    for type_name in &filtered_types {
        builder = register_filters(builder, &sdl.objects[type_name], &kinds);
    }
    builder = builder.register(query);

    let mut mutations = HashMap::new();
    if !sdl.mutations.is_empty() {
        let mut mutation = Object::new("Mutation");
        for def in &sdl.mutations {
            let function = catalog::function(client, &def.function)
                .await
                .map_err(|e| error(def.line, format!("mutation {}: {e}", def.name)))?;
            let plan = MutationPlan::new(def, function, sdl, &views, &kinds)
                .map_err(|(line, m)| error(line, format!("mutation {}: {m}", def.name)))?;
            let plan = Arc::new(plan);
            mutations.insert(def.name.clone(), (def.clone(), plan.clone()));
            mutation = mutation.field(mutation_field(def, plan));
        }
        builder = builder.register(mutation);
    }

    if !sdl.subscriptions.is_empty() {
        let mut subscription = Subscription::new("Subscription");
        for def in &sdl.subscriptions {
            let plan = SubscriptionPlan::new(def, sdl, &views, &kinds)
                .map_err(|m| error(def.line, format!("subscription {}: {m}", def.name)))?;
            subscription = subscription.field(subscription_field(def, Arc::new(plan)));
        }
        builder = builder.register(subscription);
    }

    let catalog = ReadCatalog {
        queries: reads,
        mutations,
        inputs: sdl.inputs.clone(),
        objects: sdl.objects.clone(),
        enums: sdl
            .enums
            .values()
            .map(|e| (e.name.clone(), e.values.iter().cloned().collect()))
            .collect(),
        kinds: kinds.clone(),
        runtime: runtime.clone(),
    };
    builder = builder
        .data(runtime)
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity);
    if !config.introspection {
        builder = builder.disable_introspection();
    }
    let schema = builder
        .finish()
        .map_err(|e| anyhow::anyhow!("{file}: the schema is not valid GraphQL: {e}"))?;
    Ok((schema, catalog))
}

/// What compiled plans need of the schema: each query field's read, each mutation's call,
/// the types, inputs and enums.
pub struct ReadCatalog {
    pub queries: HashMap<String, Arc<QueryRead>>,
    pub mutations: HashMap<String, (MutationDef, Arc<MutationPlan>)>,
    pub inputs: BTreeMap<String, InputDef>,
    pub objects: BTreeMap<String, ObjectDef>,
    pub enums: BTreeMap<String, BTreeSet<String>>,
    kinds: Kinds,
    pub runtime: Arc<Runtime>,
}

impl ReadCatalog {
    pub fn kind(&self, type_name: &str) -> Option<Kind> {
        self.kinds.get(type_name).copied()
    }
}

fn kinds(sdl: &Sdl) -> Kinds {
    let mut kinds: Kinds = Scalar::ALL
        .iter()
        .map(|s| (s.name().to_owned(), Kind::Scalar))
        .collect();
    kinds.extend(sdl.enums.keys().map(|n| (n.clone(), Kind::Enum)));
    kinds.extend(sdl.objects.keys().map(|n| (n.clone(), Kind::Object)));
    kinds.extend(sdl.inputs.keys().map(|n| (n.clone(), Kind::Input)));
    kinds
}

fn type_ref(ty: &TypeExpr) -> TypeRef {
    let (inner, nullable) = match ty {
        TypeExpr::Named { name, nullable } => (TypeRef::Named(name.clone().into()), *nullable),
        TypeExpr::List { item, nullable } => (TypeRef::List(Box::new(type_ref(item))), *nullable),
    };
    if nullable {
        inner
    } else {
        TypeRef::NonNull(Box::new(inner))
    }
}

fn input_value(arg: &ArgDef) -> InputValue {
    let mut value = InputValue::new(&arg.name, type_ref(&arg.ty));
    if let Some(default) = arg.default.clone().and_then(|d| Value::from_json(d).ok()) {
        value = value.default_value(default);
    }
    value
}

/// An object type whose fields read its parent JSON (a view's `data`, or part of it).
fn object_type(def: &ObjectDef, kinds: &SharedKinds, with_cursor: bool) -> Object {
    let mut object = Object::new(&def.name);
    if let Some(description) = &def.description {
        object = object.description(description);
    }
    for field in &def.fields {
        let key = snake_case(&field.name);
        let name = field.name.clone();
        let ty = field.ty.clone();
        let kinds = Arc::clone(kinds);
        let mut resolved = Field::new(&field.name, type_ref(&field.ty), move |ctx| {
            let result = ctx
                .parent_value
                .try_downcast_ref::<serde_json::Value>()
                .and_then(|parent| {
                    let value = parent.get(&key).or_else(|| parent.get(&name));
                    output(value.unwrap_or(&serde_json::Value::Null), &ty, &kinds)
                });
            FieldFuture::new(async move { result })
        });
        if let Some(description) = &field.description {
            resolved = resolved.description(description);
        }
        object = object.field(resolved);
    }
    if with_cursor {
        object = object.field(
            Field::new(CURSOR_FIELD, TypeRef::named(TypeRef::STRING), |ctx| {
                let cursor = ctx
                    .parent_value
                    .try_downcast_ref::<serde_json::Value>()
                    .ok()
                    .and_then(|p| p.get(CURSOR_FIELD))
                    .and_then(|c| c.as_str())
                    .map(|c| Value::String(c.to_owned()));
                FieldFuture::from_value(cursor)
            })
            .description(
                "Where this event stands in the change stream; pass it as `after` to resume",
            ),
        );
    }
    object
}

/// The field subscriptions add to their types, and the key it travels under in the JSON.
const CURSOR_FIELD: &str = "_cursor";

/// A JSON value as the GraphQL output of type `ty`.
fn output<'a>(
    value: &'a serde_json::Value,
    ty: &TypeExpr,
    kinds: &Kinds,
) -> async_graphql::Result<Option<FieldValue<'a>>> {
    if value.is_null() {
        return Ok(None);
    }
    match ty {
        TypeExpr::List { item, .. } => {
            let items = value
                .as_array()
                .ok_or_else(|| mismatch("a list", value))?
                .iter()
                .map(|v| output(v, item, kinds).map(|o| o.unwrap_or(FieldValue::NULL)))
                .collect::<async_graphql::Result<Vec<_>>>()?;
            Ok(Some(FieldValue::list(items)))
        }
        TypeExpr::Named { name, .. } => match kinds.get(name.as_str()) {
            Some(Kind::Object) => Ok(Some(FieldValue::borrowed_any(value))),
            Some(Kind::Enum) => {
                let text = value
                    .as_str()
                    .ok_or_else(|| mismatch("an enum value", value))?;
                Ok(Some(FieldValue::value(scalars::enum_value(text))))
            }
            _ => {
                let output = Scalar::named(name)
                    .and_then(|scalar| scalar.output(value))
                    .ok_or_else(|| mismatch(name, value))?;
                Ok(Some(FieldValue::value(output.into_value()?)))
            }
        },
    }
}

fn mismatch(expected: &str, value: &serde_json::Value) -> async_graphql::Error {
    let found = match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    };
    async_graphql::Error::new(format!(
        "the view's data has {found} where the schema expects {expected}"
    ))
    .extend_with(|_, e| e.set("code", "SCHEMA_MISMATCH"))
}

fn user_error(code: &str, message: impl Into<String>) -> async_graphql::Error {
    let code = code.to_owned();
    async_graphql::Error::new(message).extend_with(move |_, e| e.set("code", code.clone()))
}

fn is_paging_arg(def: &QueryDef, name: &str) -> bool {
    def.ty.is_list() && ["limit", "offset", "where", "orderBy"].contains(&name)
}

fn filter_name(scalar: &str) -> String {
    format!("{scalar}Filter")
}

/// `<Type>Where`, `<Type>OrderBy` and the per-scalar filter inputs they use.
fn register_filters(
    mut builder: SchemaBuilder,
    object: &ObjectDef,
    kinds: &Kinds,
) -> SchemaBuilder {
    let where_name = format!("{}Where", object.name);
    let mut filter = InputObject::new(&where_name)
        .field(InputValue::new("_and", TypeRef::named_nn_list(&where_name)))
        .field(InputValue::new("_or", TypeRef::named_nn_list(&where_name)))
        .field(InputValue::new("_not", TypeRef::named(&where_name)));
    let mut order = InputObject::new(format!("{}OrderBy", object.name));
    let mut sortable = 0;
    for field in &object.fields {
        let base = field.ty.base_name();
        let kind = match kinds.get(base) {
            _ if field.ty.is_list() => continue,
            Some(Kind::Enum) => FilterKind::Ordered,
            Some(Kind::Scalar) => scalar_sql_type(base).map_or(FilterKind::Text, |(_, k)| k),
            _ => continue,
        };
        filter = filter.field(InputValue::new(
            &field.name,
            TypeRef::named(filter_name(base)),
        ));
        if base != "JSON" {
            order = order.field(InputValue::new(
                &field.name,
                TypeRef::named("SortDirection"),
            ));
            sortable += 1;
        }
        builder = register_scalar_filter(builder, base, kind);
    }
    if sortable == 0 {
        order = order.field(InputValue::new("_none", TypeRef::named(TypeRef::BOOLEAN)));
    }
    builder
        .register(filter)
        .register(order)
        .register(Enum::new("SortDirection").item("ASC").item("DESC"))
}

fn register_scalar_filter(builder: SchemaBuilder, scalar: &str, kind: FilterKind) -> SchemaBuilder {
    let mut input = InputObject::new(filter_name(scalar));
    for op in kind.operators() {
        let ty = match *op {
            "in" | "nin" => TypeRef::named_nn_list(scalar),
            "like" | "ilike" => TypeRef::named(TypeRef::STRING),
            "isnull" => TypeRef::named(TypeRef::BOOLEAN),
            _ => TypeRef::named(scalar),
        };
        input = input.field(InputValue::new(*op, ty));
    }
    // Registering the same input twice replaces it with an identical one.
    builder.register(input)
}

fn query_field(def: &QueryDef, read: Arc<QueryRead>) -> Field {
    let list = def.ty.is_list();
    let declared: BTreeSet<String> = def.args.iter().map(|a| a.name.clone()).collect();
    let type_name = def.ty.base_name().to_owned();
    let mut field = Field::new(&def.name, type_ref(&def.ty), move |ctx| {
        let read = read.clone();
        FieldFuture::new(async move {
            let runtime = ctx.data::<Arc<Runtime>>()?;
            let identity = ctx.data::<Identity>()?;
            let argument = |name: &str| {
                ctx.args
                    .get(name)
                    .filter(|v| !v.is_null())
                    .map(|v| v.as_value().clone())
            };
            let (sql, params) = read.sql(argument, runtime)?;
            let rows = runtime
                .db
                .read(identity, &sql, &params)
                .await
                .map_err(client_error)?;
            let values = rows
                .into_iter()
                .map(|row| parse_data(row.get(0)))
                .collect::<async_graphql::Result<Vec<_>>>()?;
            if list {
                Ok(Some(FieldValue::list(
                    values.into_iter().map(FieldValue::owned_any),
                )))
            } else {
                Ok(values.into_iter().next().map(FieldValue::owned_any))
            }
        })
    });
    if let Some(description) = &def.description {
        field = field.description(description);
    }
    for arg in &def.args {
        field = field.argument(input_value(arg));
    }
    if list {
        for (name, ty) in [
            ("where", TypeRef::named(format!("{type_name}Where"))),
            (
                "orderBy",
                TypeRef::named_nn_list(format!("{type_name}OrderBy")),
            ),
            ("limit", TypeRef::named(TypeRef::INT)),
            ("offset", TypeRef::named(TypeRef::INT)),
        ] {
            if !declared.contains(name) {
                field = field.argument(InputValue::new(name, ty));
            }
        }
    }
    field
}

/// How a query field reads its view: the table, and which arguments filter by equality.
pub struct QueryRead {
    pub def: QueryDef,
    table: Arc<Table>,
    equality_args: Vec<String>,
}

impl QueryRead {
    fn new(def: &QueryDef, table: Arc<Table>) -> Self {
        let equality_args = def
            .args
            .iter()
            .filter(|a| !is_paging_arg(def, &a.name))
            .map(|a| a.name.clone())
            .collect();
        Self {
            def: def.clone(),
            table,
            equality_args,
        }
    }

    /// The statement for one call; `argument` gives each argument's value, `None` when it is
    /// absent or null (after defaults).
    pub fn sql(
        &self,
        argument: impl Fn(&str) -> Option<Value>,
        runtime: &Runtime,
    ) -> async_graphql::Result<(String, Vec<Param>)> {
        let bad_input = |e: super::sql::BuildError| user_error("BAD_USER_INPUT", e.to_string());
        let list = self.def.ty.is_list();
        let table = &self.table;
        let mut select = Select::new(&table.columns);
        let mut conditions = Vec::new();
        for name in &self.equality_args {
            let Some(value) = argument(name) else {
                continue;
            };
            let column = &table.columns[name];
            let p = select.bind(Param::Text(value_text(&value)));
            conditions.push(format!("{} = {p}::text::{}", column.expr, column.sql_type));
        }
        let mut order_terms = Vec::new();
        let mut limit = if list { runtime.default_limit } else { 1 };
        let mut offset = 0;
        if list {
            if let Some(filter) = argument("where") {
                let Value::Object(filter) = filter else {
                    return Err(user_error("BAD_USER_INPUT", "where must be an object"));
                };
                conditions.push(select.condition(&filter).map_err(bad_input)?);
            }
            if let Some(order) = argument("orderBy") {
                let terms = match order {
                    Value::List(items) => items,
                    single => vec![single],
                };
                order_terms = select.order_by(&terms).map_err(bad_input)?;
            }
            if let Some(value) = argument("limit") {
                limit = integer(&value, "limit")?;
            }
            if let Some(value) = argument("offset") {
                offset = integer(&value, "offset")?;
            }
            if !(0..=runtime.max_limit).contains(&limit) {
                return Err(user_error(
                    "BAD_USER_INPUT",
                    format!(
                        "limit must be between 0 and {} (graphql.max_limit)",
                        runtime.max_limit
                    ),
                ));
            }
            if offset < 0 {
                return Err(user_error("BAD_USER_INPUT", "offset must not be negative"));
            }
        }
        let condition = if conditions.is_empty() {
            "TRUE".to_owned()
        } else {
            conditions.join(" AND ")
        };
        let mut sql = table.select_sql(&condition);
        if !order_terms.is_empty() {
            sql.push_str(" ORDER BY ");
            sql.push_str(&order_terms.join(", "));
        }
        let limit_param = select.bind(Param::Text(Some(limit.to_string())));
        sql.push_str(&format!(" LIMIT {limit_param}::text::bigint"));
        if offset > 0 {
            let offset_param = select.bind(Param::Text(Some(offset.to_string())));
            sql.push_str(&format!(" OFFSET {offset_param}::text::bigint"));
        }
        Ok((sql, select.params))
    }
}

fn integer(value: &Value, name: &str) -> async_graphql::Result<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| user_error("BAD_USER_INPUT", format!("{name} must be an integer")))
}

pub(super) fn parse_data(text: Option<&str>) -> async_graphql::Result<serde_json::Value> {
    match text {
        None => Ok(serde_json::Value::Null),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| user_error("INTERNAL", format!("the view returned invalid JSON: {e}"))),
    }
}

/// Where a function parameter's value comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A request argument, or a field of the `input` argument.
    Argument {
        path: Vec<String>,
        shape: Shape,
    },
    Claim(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scalar,
    Json,
    Array,
}

struct Binding {
    param: catalog::Param,
    source: Option<Source>,
}

/// A mutation, resolved against its function's signature at start-up.
pub struct MutationPlan {
    function: Function,
    bindings: Vec<Binding>,
    /// Re-reads the entity by `entity_id` when the function returns none.
    reread_sql: Option<String>,
}

impl MutationPlan {
    fn new(
        def: &MutationDef,
        function: Function,
        sdl: &Sdl,
        views: &BTreeMap<String, View>,
        kinds: &Kinds,
    ) -> Result<Self, (usize, String)> {
        let mut candidates: Vec<(&ArgDef, Vec<String>)> = Vec::new();
        match def.args.as_slice() {
            [only]
                if only.name == "input"
                    && kinds.get(only.ty.base_name()) == Some(&Kind::Input)
                    && !only.ty.is_list() =>
            {
                for field in &sdl.inputs[only.ty.base_name()].fields {
                    candidates.push((field, vec!["input".into(), field.name.clone()]));
                }
            }
            args => candidates.extend(args.iter().map(|a| (a, vec![a.name.clone()]))),
        }
        let param_names: Vec<&str> = function.params.iter().map(|p| p.name.as_str()).collect();
        let mut sources: BTreeMap<String, Source> = BTreeMap::new();
        for (arg, path) in candidates {
            let wanted = format!("p_{}", snake_case(&arg.name));
            let param = function
                .params
                .iter()
                .find(|p| p.name == wanted)
                .ok_or_else(|| {
                    (
                        arg.line,
                        format!(
                            "argument `{}`: {} has no parameter {wanted} (it has: {})",
                            arg.name,
                            def.function,
                            param_names.join(", ")
                        ),
                    )
                })?;
            let shape = if param.sql_type.ends_with("[]") {
                Shape::Array
            } else if param.sql_type == "jsonb" || param.sql_type == "json" {
                Shape::Json
            } else {
                Shape::Scalar
            };
            let structured =
                arg.ty.is_list() || kinds.get(arg.ty.base_name()) == Some(&Kind::Input);
            if structured && shape == Shape::Scalar {
                return Err((
                    arg.line,
                    format!(
                        "argument `{}` is a list or an input object, but {wanted} is {}; \
                         declare the parameter jsonb (or an array type for a list of scalars)",
                        arg.name, param.sql_type
                    ),
                ));
            }
            sources.insert(wanted, Source::Argument { path, shape });
        }
        for (param, claim) in &def.claims {
            if !param_names.contains(&param.as_str()) {
                return Err((
                    def.line,
                    format!(
                        "@function(claims:) names {param}, which {} does not have",
                        def.function
                    ),
                ));
            }
            sources.insert(param.clone(), Source::Claim(claim.clone()));
        }
        let mut bindings = Vec::new();
        for param in &function.params {
            let source = sources.remove(&param.name);
            if source.is_none() && !param.has_default {
                let suffix = param.name.strip_prefix("p_").unwrap_or(&param.name);
                return Err((
                    def.line,
                    format!(
                        "nothing supplies parameter {} of {}: add an argument `{}` or \
                         @function(claims: {{{}: \"<claim>\"}})",
                        param.name, def.function, suffix, param.name
                    ),
                ));
            }
            bindings.push(Binding {
                param: param.clone(),
                source,
            });
        }
        let object = &sdl.objects[def.ty.base_name()];
        let reread_sql = object.view.as_ref().and_then(|name| {
            let view = &views[name];
            view.columns.get("id").map(|id_type| {
                format!(
                    "SELECT data::text FROM {} WHERE \"id\" = \
                     nullif(current_setting('walstream.entity_id', true), '')::{id_type}",
                    view.sql_name
                )
            })
        });
        Ok(Self {
            function,
            bindings,
            reread_sql,
        })
    }

    /// The call and its parameters for one request.
    fn call(
        &self,
        argument: &impl Fn(&str) -> Option<Value>,
        identity: &Identity,
    ) -> async_graphql::Result<(String, Vec<Param>)> {
        let mut params = Vec::new();
        let mut named = Vec::new();
        for binding in &self.bindings {
            let Some(source) = &binding.source else {
                continue;
            };
            let (param, cast) = match source {
                Source::Argument { path, shape } => {
                    let Some(value) = lookup(argument, path) else {
                        if binding.param.has_default {
                            continue;
                        }
                        params.push(Param::Text(None));
                        named.push((binding, "text"));
                        continue;
                    };
                    match shape {
                        Shape::Scalar => (Param::Text(value_text(&value)), "text"),
                        Shape::Json => (
                            Param::Text(Some(
                                value.into_json().map_err(|e| e.to_string())?.to_string(),
                            )),
                            "text",
                        ),
                        Shape::Array => match value {
                            Value::List(items) => (
                                Param::TextArray(items.iter().map(value_text).collect()),
                                "text[]",
                            ),
                            Value::Null => (Param::Text(None), "text"),
                            single => (Param::TextArray(vec![value_text(&single)]), "text[]"),
                        },
                    }
                }
                Source::Claim(claim) => {
                    let value =
                        identity
                            .claims
                            .get(claim)
                            .filter(|v| !v.is_null())
                            .ok_or_else(|| {
                                user_error(
                            "FORBIDDEN",
                            format!("the token has no `{claim}` claim, which this mutation needs"),
                        )
                            })?;
                    let text = match value {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (Param::Text(Some(text)), "text")
                }
            };
            params.push(param);
            named.push((binding, cast));
        }
        let arguments: Vec<String> = named
            .iter()
            .enumerate()
            .map(|(i, (binding, cast))| {
                format!(
                    "{} => ${}::{cast}::{}",
                    quote_ident(&binding.param.name),
                    i + 1,
                    binding.param.sql_type
                )
            })
            .collect();
        let sql = format!(
            "SELECT to_jsonb(r)::text, \
             set_config('walstream.entity_id', coalesce(r.entity_id::text, ''), true) \
             FROM {}({}) AS r",
            self.function.sql_name,
            arguments.join(", ")
        );
        Ok((sql, params))
    }

    /// Calls the function with the arguments `argument` gives, as `identity`: the entity to
    /// return (`None` for none), or the error the caller gets.
    pub async fn run(
        &self,
        argument: &impl Fn(&str) -> Option<Value>,
        identity: &Identity,
        runtime: &Runtime,
    ) -> async_graphql::Result<Option<serde_json::Value>> {
        let (call_sql, params) = self.call(argument, identity)?;
        let mut statements = vec![Statement {
            sql: &call_sql,
            params: &params,
        }];
        if let Some(reread) = &self.reread_sql {
            statements.push(Statement {
                sql: reread,
                params: &[],
            });
        }
        let rows = runtime
            .db
            .write_transaction(identity, &statements)
            .await
            .map_err(client_error)?;
        let response = rows
            .first()
            .and_then(|r| r.first())
            .map(|row| parse_data(row.get(0)))
            .transpose()?
            .ok_or_else(|| user_error("INTERNAL", "the function returned no row"))?;
        let entity = match interpret(self.function.response, &response) {
            Ok(Outcome::Success { entity }) => entity,
            Ok(Outcome::Failure(failure)) => {
                let error =
                    async_graphql::Error::new(failure.message.clone()).extend_with(|_, e| {
                        e.set("code", failure.code.clone());
                        e.set("status", failure.status.clone());
                        if let Some(detail) = failure
                            .detail
                            .clone()
                            .and_then(|d| Value::from_json(d).ok())
                        {
                            e.set("detail", detail);
                        }
                    });
                return Err(error);
            }
            Err(inconsistent) => {
                tracing::error!(function = %self.function.sql_name, "inconsistent mutation_response: {inconsistent}");
                return Err(user_error(
                    "INTERNAL",
                    "the function returned an inconsistent mutation_response; the server log has the details",
                ));
            }
        };
        let entity = match entity {
            Some(entity) => Some(entity),
            None => match rows.get(1).and_then(|r| r.first()) {
                Some(row) => Some(parse_data(row.get(0))?),
                None => None,
            },
        };
        Ok(entity)
    }
}

/// A request argument by path (`input.total`); `None` when absent.
fn lookup(argument: &impl Fn(&str) -> Option<Value>, path: &[String]) -> Option<Value> {
    let (first, rest) = path.split_first()?;
    let mut value = argument(first)?;
    for key in rest {
        value = match value {
            Value::Object(mut map) => map.shift_remove(key.as_str())?,
            _ => return None,
        };
    }
    Some(value)
}

fn mutation_field(def: &MutationDef, plan: Arc<MutationPlan>) -> Field {
    let mut field = Field::new(&def.name, type_ref(&def.ty), move |ctx| {
        let plan = plan.clone();
        FieldFuture::new(async move {
            let runtime = ctx.data::<Arc<Runtime>>()?;
            let identity = ctx.data::<Identity>()?;
            let argument = |name: &str| ctx.args.get(name).map(|v| v.as_value().clone());
            let entity = plan.run(&argument, identity, runtime).await?;
            Ok(entity.map(FieldValue::owned_any))
        })
    });
    if let Some(description) = &def.description {
        field = field.description(description);
    }
    for arg in &def.args {
        field = field.argument(input_value(arg));
    }
    field
}

/// A subscription, resolved at start-up: which events, how they are filtered and how each
/// is re-read as the subscriber.
struct SubscriptionPlan {
    source: EventSource,
    /// Argument → event data key.
    filters: Vec<(String, String)>,
    /// Reads the row through the type's view, as the subscriber, by the event's key.
    reread: Option<(String, String)>,
}

const AFTER_ARG: &str = "after";

impl SubscriptionPlan {
    fn new(
        def: &SubscriptionDef,
        sdl: &Sdl,
        views: &BTreeMap<String, View>,
        kinds: &Kinds,
    ) -> Result<Self, String> {
        let filters = def
            .args
            .iter()
            .filter(|a| a.name != AFTER_ARG)
            .map(|a| {
                if a.ty.is_list() || kinds.get(a.ty.base_name()) == Some(&Kind::Input) {
                    return Err(format!(
                        "argument `{}`: filters take one scalar value",
                        a.name
                    ));
                }
                Ok((
                    a.name.clone(),
                    a.filter_key.clone().unwrap_or_else(|| snake_case(&a.name)),
                ))
            })
            .collect::<Result<_, _>>()?;
        let object = &sdl.objects[def.ty.base_name()];
        let reread = match &object.view {
            None => None,
            Some(name) => {
                let view = &views[name];
                let key_type = view.columns.get(&def.key).ok_or_else(|| {
                    format!(
                        "view {} has no column `{}` to find each event's row by; \
                         set @subscribe(key: \"<column>\")",
                        name, def.key
                    )
                })?;
                Some((
                    format!(
                        "SELECT data::text FROM {} WHERE {} = $1::text::{key_type}",
                        view.sql_name,
                        quote_ident(&def.key)
                    ),
                    def.key.clone(),
                ))
            }
        };
        Ok(Self {
            source: def.source.clone(),
            filters,
            reread,
        })
    }

    fn subject_filter(&self) -> Option<String> {
        match &self.source {
            EventSource::Subject(subject) => Some(subject.clone()),
            EventSource::Entity { .. } => None,
        }
    }

    /// Whether an event envelope is one this subscription (with these argument values) wants.
    fn wants(&self, envelope: &serde_json::Value, arguments: &[(String, Value)]) -> bool {
        if let EventSource::Entity { entity, events } = &self.source {
            let op = envelope["event"].as_str().unwrap_or_default();
            if envelope["entity"].as_str() != Some(entity.as_str())
                || (!events.is_empty() && !events.iter().any(|e| e == op))
            {
                return false;
            }
        }
        let data = &envelope["data"];
        arguments.iter().all(|(key, expected)| {
            let actual = &data[key.as_str()];
            match (actual, value_text(expected)) {
                (serde_json::Value::String(s), Some(e)) => *s == e,
                (other, Some(e)) if !other.is_null() => {
                    // Numbers and booleans compare by their JSON text (`7` = "7").
                    let text = other.to_string();
                    text == e
                }
                _ => false,
            }
        })
    }

    /// The row to deliver for an event: looked up through the view as the subscriber (so
    /// row-level security applies; a row the view does not show is not delivered), or the
    /// event's own data when the type has no view.
    async fn row(
        &self,
        envelope: &serde_json::Value,
        runtime: &Runtime,
        identity: &Identity,
    ) -> async_graphql::Result<Option<serde_json::Value>> {
        let data = &envelope["data"];
        let Some((sql, key)) = &self.reread else {
            return Ok(Some(data.clone()));
        };
        let Some(key_value) =
            value_text(&Value::from_json(data[key.as_str()].clone()).unwrap_or(Value::Null))
        else {
            return Ok(None);
        };
        let params = [Param::Text(Some(key_value))];
        let rows = runtime
            .db
            .read(identity, sql, &params)
            .await
            .map_err(client_error)?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let mut visible = parse_data(row.get(0))?;
        // The view decides what the subscriber may see and its shape; the event says what
        // the change wrote. Keys in both take the event's value, so a replayed event shows
        // the row as of that change rather than as of now.
        if let (Some(visible), Some(changed)) = (visible.as_object_mut(), data.as_object()) {
            for (key, value) in visible.iter_mut() {
                if let Some(new) = changed.get(key) {
                    *value = new.clone();
                }
            }
        }
        Ok(Some(visible))
    }
}

fn subscription_field(def: &SubscriptionDef, plan: Arc<SubscriptionPlan>) -> SubscriptionField {
    let mut field = SubscriptionField::new(&def.name, type_ref(&def.ty), move |ctx| {
        let plan = plan.clone();
        SubscriptionFieldFuture::new(async move {
            let runtime = ctx.data::<Arc<Runtime>>()?.clone();
            let identity = ctx.data::<Identity>()?.clone();
            let feed = runtime.feed.clone().ok_or_else(|| {
                user_error(
                    "UNAVAILABLE",
                    "subscriptions need NATS; this server has no change feed",
                )
            })?;
            let after: Option<Position> = match ctx.args.get(AFTER_ARG).filter(|v| !v.is_null()) {
                Some(cursor) => Some(
                    parse_cursor(cursor.string()?)
                        .map_err(|e| user_error("BAD_USER_INPUT", e.to_string()))?,
                ),
                None => None,
            };
            let arguments: Vec<(String, Value)> = plan
                .filters
                .iter()
                .filter_map(|(arg, key)| {
                    ctx.args
                        .get(arg)
                        .filter(|v| !v.is_null())
                        .map(|v| (key.clone(), v.as_value().clone()))
                })
                .collect();
            let deliveries = tokio_stream::wrappers::ReceiverStream::new(
                feed.subscribe(plan.subject_filter(), after),
            );
            let stream = deliveries.filter_map(move |delivery| {
                let plan = plan.clone();
                let runtime = runtime.clone();
                let identity = identity.clone();
                let arguments = arguments.clone();
                async move {
                    let event = match delivery {
                        Ok(event) => event,
                        Err(error) => {
                            return Some(Err(user_error("SUBSCRIPTION_STOPPED", error.to_string())))
                        }
                    };
                    let envelope: serde_json::Value = match serde_json::from_slice(&event.payload) {
                        Ok(envelope) => envelope,
                        Err(_) => return None,
                    };
                    if !plan.wants(&envelope, &arguments) {
                        return None;
                    }
                    let cursor = envelope_cursor(&envelope)?;
                    match plan.row(&envelope, &runtime, &identity).await {
                        Ok(Some(mut row)) => {
                            if let Some(object) = row.as_object_mut() {
                                object
                                    .insert(CURSOR_FIELD.into(), serde_json::Value::String(cursor));
                            }
                            Some(Ok(FieldValue::owned_any(row)))
                        }
                        Ok(None) => None,
                        Err(error) => Some(Err(error)),
                    }
                }
            });
            Ok(stream)
        })
    });
    if let Some(description) = &def.description {
        field = field.description(description);
    }
    for arg in &def.args {
        field = field.argument(input_value(arg));
    }
    if !def.args.iter().any(|a| a.name == AFTER_ARG) {
        field = field.argument(
            InputValue::new(AFTER_ARG, TypeRef::named(TypeRef::STRING))
                .description("Resume after this `_cursor`: missed events are replayed first"),
        );
    }
    field
}

/// The cursor of an event: its commit LSN and place in the transaction.
fn envelope_cursor(envelope: &serde_json::Value) -> Option<String> {
    let lsn = envelope["lsn"].as_str()?;
    let seq = envelope["seq"].as_u64()?;
    let position = Position {
        commit_lsn: crate::lsn::parse_lsn(lsn).ok()?,
        seq,
    };
    Some(format_cursor(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_follow_the_schema_type() {
        let kinds: Kinds = Scalar::ALL
            .iter()
            .map(|s| (s.name().to_owned(), Kind::Scalar))
            .collect();
        let int: TypeExpr = TypeExpr::Named {
            name: "Int".into(),
            nullable: true,
        };
        assert!(output(&serde_json::json!("x"), &int, &kinds).is_err());
        let ty = TypeExpr::List {
            item: Box::new(TypeExpr::Named {
                name: "Int".into(),
                nullable: true,
            }),
            nullable: false,
        };
        let list = serde_json::json!([1, null, 3]);
        assert!(output(&list, &ty, &kinds).expect("list").is_some());
    }
}
