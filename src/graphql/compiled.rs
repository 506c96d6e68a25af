//! Compiled plans: a document of view lookups, or of one mutation, once the executor has
//! answered it without error, is answered again from its SQL and a projection of each row's
//! JSON, without parsing, validating or resolving field by field. What a plan is not sure to
//! answer as the executor would (a variable of the wrong type; for reads, a database error or
//! data that does not fit the schema) goes back to the executor before anything is written.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
};
use async_graphql::{ErrorExtensions, Name, Pos, Value};
use serde_json::Value as Json;

use super::auth::Identity;
use super::scalars::Scalar;
use super::schema::{parse_data, Kind, MutationPlan, QueryRead, ReadCatalog};
use super::sdl::{snake_case, ArgDef, MutationDef, TypeExpr};

/// Plans kept before the cache starts over (as for parsed documents).
const MAX_PLANS: usize = 1024;

/// The plans learned so far, by query text and operation name: one document can hold several
/// operations, and which one runs (or whether the request is an error) depends on the name.
pub struct Plans {
    catalog: ReadCatalog,
    plans: Mutex<HashMap<Arc<str>, Vec<Learned>>>,
}

struct Learned {
    operation_name: Option<Box<str>>,
    /// `None`: the operation was looked at and is not one a plan can answer.
    plan: Option<Arc<Plan>>,
}

/// What to do with a request's query text.
pub enum Lookup {
    Plan(Arc<Plan>),
    /// Not seen yet: let the executor answer, then `learn` from it.
    Unknown,
    NotCompilable,
}

/// One compiled operation.
pub struct Plan {
    variables: Vec<VariablePlan>,
    operation: OperationPlan,
}

enum OperationPlan {
    /// Root fields that each read a view.
    Reads(Vec<ReadPlan>),
    /// One mutation field.
    Mutation(Box<MutationRoot>),
}

struct VariablePlan {
    name: Name,
    ty: TypeExpr,
    default: Option<Value>,
}

/// A root field written in the document: its response key, arguments (variables still to be
/// substituted) and selection.
struct RootField {
    response_key: String,
    arguments: Vec<(String, async_graphql_value::Value)>,
    selection: Vec<FieldPlan>,
    position: Pos,
}

struct ReadPlan {
    field: RootField,
    read: Arc<QueryRead>,
}

struct MutationRoot {
    field: RootField,
    def: MutationDef,
    plan: Arc<MutationPlan>,
}

/// A field of an object, read from its parent's JSON.
struct FieldPlan {
    response_key: String,
    output: FieldOutput,
}

enum FieldOutput {
    Typename(String),
    Data {
        json_key: String,
        name: String,
        ty: TypeExpr,
        selection: Vec<FieldPlan>,
    },
}

/// Why a plan hands a request back to the executor.
#[derive(Debug)]
pub struct Fallback;

impl Plans {
    pub fn new(catalog: ReadCatalog) -> Self {
        Self {
            catalog,
            plans: Mutex::default(),
        }
    }

    pub fn lookup(&self, query: &str, operation_name: Option<&str>) -> Lookup {
        let Ok(plans) = self.plans.lock() else {
            return Lookup::NotCompilable;
        };
        let learned = plans.get(query).and_then(|learned| {
            learned
                .iter()
                .find(|l| l.operation_name.as_deref() == operation_name)
        });
        match learned {
            Some(Learned {
                plan: Some(plan), ..
            }) => Lookup::Plan(plan.clone()),
            Some(Learned { plan: None, .. }) => Lookup::NotCompilable,
            None => Lookup::Unknown,
        }
    }

    /// Records a plan for `query` (or that it has none). Call it only after the executor
    /// answered the document without errors: the plan skips the validation it passed.
    pub fn learn(&self, query: &str, operation_name: Option<&str>, document: &ExecutableDocument) {
        let plan = compile(&self.catalog, operation_name, document).map(Arc::new);
        let Ok(mut plans) = self.plans.lock() else {
            return;
        };
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        let learned = plans.entry(Arc::from(query)).or_default();
        learned.retain(|l| l.operation_name.as_deref() != operation_name);
        learned.push(Learned {
            operation_name: operation_name.map(Box::from),
            plan,
        });
    }

    /// The response body for `plan` with these variables, or `Fallback`.
    pub async fn answer(
        &self,
        plan: &Plan,
        variables: &serde_json::Map<String, Json>,
        identity: &Identity,
    ) -> Result<Vec<u8>, Fallback> {
        let variables = bind_variables(&plan.variables, variables, &self.catalog)?;
        match &plan.operation {
            OperationPlan::Reads(reads) => self.answer_reads(reads, &variables, identity).await,
            OperationPlan::Mutation(root) => self.answer_mutation(root, &variables, identity).await,
        }
    }

    async fn answer_reads(
        &self,
        reads: &[ReadPlan],
        variables: &HashMap<Name, Value>,
        identity: &Identity,
    ) -> Result<Vec<u8>, Fallback> {
        let runtime = &self.catalog.runtime;
        let results = futures::future::join_all(reads.iter().map(|plan| async {
            let mut arguments =
                root_arguments(&plan.read.def.args, &plan.field.arguments, variables)?;
            arguments.retain(|_, value| *value != Value::Null);
            let (sql, params) = plan
                .read
                .sql(|name| arguments.get(name).cloned(), runtime)
                .map_err(|_| Fallback)?;
            let rows = runtime
                .db
                .read(identity, &sql, &params)
                .await
                .map_err(|_| Fallback)?;
            rows.iter()
                .map(|row| parse_data(row.get(0)).map_err(|_| Fallback))
                .collect::<Result<Vec<Json>, Fallback>>()
        }))
        .await;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"data\":{");
        for (index, (plan, rows)) in reads.iter().zip(results).enumerate() {
            let rows = rows?;
            if index > 0 {
                out.push(b',');
            }
            write_key(&mut out, &plan.field.response_key);
            let ty = &plan.read.def.ty;
            if ty.is_list() {
                write_list(&mut out, &rows, ty, &plan.field.selection, &self.catalog)?;
            } else {
                let row = rows.into_iter().next().unwrap_or(Json::Null);
                write_value(&mut out, &row, ty, &plan.field.selection, &self.catalog)?;
            }
        }
        out.extend_from_slice(b"}}");
        Ok(out)
    }

    /// Runs the mutation and answers whatever comes of it: once the function is called, the
    /// request is never handed back (that would call it twice).
    async fn answer_mutation(
        &self,
        root: &MutationRoot,
        variables: &HashMap<Name, Value>,
        identity: &Identity,
    ) -> Result<Vec<u8>, Fallback> {
        let arguments = root_arguments(&root.def.args, &root.field.arguments, variables)?;
        let argument = |name: &str| arguments.get(name).cloned();
        let error = match root
            .plan
            .run(&argument, identity, &self.catalog.runtime)
            .await
        {
            Ok(entity) => {
                let entity = entity.unwrap_or(Json::Null);
                let mut out = Vec::with_capacity(256);
                out.extend_from_slice(b"{\"data\":{");
                write_key(&mut out, &root.field.response_key);
                let written = write_value(
                    &mut out,
                    &entity,
                    &root.def.ty,
                    &root.field.selection,
                    &self.catalog,
                );
                if written.is_ok() {
                    out.extend_from_slice(b"}}");
                    return Ok(out);
                }
                async_graphql::Error::new(
                    "the entity the mutation returned does not fit the schema's type",
                )
                .extend_with(|_, e| e.set("code", "SCHEMA_MISMATCH"))
            }
            Err(error) => error,
        };
        Ok(error_response(&root.field, error))
    }
}

/// The executor's answer to a mutation whose field failed: no data, the error at the field.
fn error_response(field: &RootField, error: async_graphql::Error) -> Vec<u8> {
    let mut response = async_graphql::Response::new(Value::Null);
    response.errors = vec![error.into_server_error(field.position)];
    serde_json::to_vec(&response).unwrap_or_default()
}

fn compile(
    catalog: &ReadCatalog,
    operation_name: Option<&str>,
    document: &ExecutableDocument,
) -> Option<Plan> {
    if !document.fragments.is_empty() {
        return None;
    }
    // The operation async-graphql's executor runs for this name; where it answers with an
    // error instead, there is no plan.
    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), None) => operation,
        (DocumentOperations::Single(_), Some(_)) => return None,
        (DocumentOperations::Multiple(operations), Some(wanted)) => operations.get(wanted)?,
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => {
            operations.values().next()?
        }
        (DocumentOperations::Multiple(_), None) => return None,
    };
    let operation = &operation.node;
    if !operation.directives.is_empty() {
        return None;
    }
    let variables = operation
        .variable_definitions
        .iter()
        .map(|definition| {
            let definition = &definition.node;
            if !definition.directives.is_empty() {
                return None;
            }
            Some(VariablePlan {
                name: definition.name.node.clone(),
                ty: TypeExpr::from_parsed(&definition.var_type.node),
                default: definition.default_value.as_ref().map(|v| v.node.clone()),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let mut fields = Vec::new();
    let mut keys = BTreeSet::new();
    for selection in &operation.selection_set.node.items {
        let Selection::Field(field) = &selection.node else {
            return None;
        };
        let position = field.pos;
        let field = &field.node;
        let response_key = field.response_key().node.to_string();
        if !field.directives.is_empty() || !keys.insert(response_key.clone()) {
            return None;
        }
        fields.push((field, response_key, position));
    }
    let root =
        |(field, response_key, position): (&async_graphql::parser::types::Field, String, Pos),
         type_name: &str| {
            Some(RootField {
                response_key,
                arguments: field
                    .arguments
                    .iter()
                    .map(|(name, value)| (name.node.to_string(), value.node.clone()))
                    .collect(),
                selection: object_selection(&field.selection_set.node, type_name, catalog)?,
                position,
            })
        };
    let operation = match operation.ty {
        OperationType::Query => OperationPlan::Reads(
            fields
                .into_iter()
                .map(|field| {
                    let read = catalog.queries.get(field.0.name.node.as_str())?.clone();
                    let field = root(field, read.def.ty.base_name())?;
                    Some(ReadPlan { field, read })
                })
                .collect::<Option<Vec<_>>>()?,
        ),
        // Several mutation fields run one after another, each seeing the last: the executor's.
        OperationType::Mutation if fields.len() == 1 => {
            let field = fields.pop()?;
            let (def, plan) = catalog.mutations.get(field.0.name.node.as_str())?.clone();
            let field = root(field, def.ty.base_name())?;
            OperationPlan::Mutation(Box::new(MutationRoot { field, def, plan }))
        }
        _ => return None,
    };
    Some(Plan {
        variables,
        operation,
    })
}

/// The plan for the fields selected on an object type.
fn object_selection(
    set: &SelectionSet,
    type_name: &str,
    catalog: &ReadCatalog,
) -> Option<Vec<FieldPlan>> {
    let object = catalog.objects.get(type_name)?;
    let mut fields = Vec::with_capacity(set.items.len());
    let mut keys = BTreeSet::new();
    for selection in &set.items {
        let Selection::Field(field) = &selection.node else {
            return None;
        };
        let field = &field.node;
        let response_key = field.response_key().node.to_string();
        if !field.directives.is_empty()
            || !field.arguments.is_empty()
            || !keys.insert(response_key.clone())
        {
            return None;
        }
        let name = field.name.node.as_str();
        if name == "__typename" {
            fields.push(FieldPlan {
                response_key,
                output: FieldOutput::Typename(type_name.to_owned()),
            });
            continue;
        }
        let def = object.fields.iter().find(|f| f.name == name)?;
        let selection = match catalog.kind(def.ty.base_name())? {
            Kind::Object => {
                object_selection(&field.selection_set.node, def.ty.base_name(), catalog)?
            }
            Kind::Scalar | Kind::Enum => Vec::new(),
            Kind::Input => return None,
        };
        fields.push(FieldPlan {
            response_key,
            output: FieldOutput::Data {
                json_key: snake_case(name),
                name: name.to_owned(),
                ty: def.ty.clone(),
                selection,
            },
        });
    }
    Some(fields)
}

/// The request's variables as GraphQL values, checked as the executor would check them.
fn bind_variables(
    plans: &[VariablePlan],
    given: &serde_json::Map<String, Json>,
    catalog: &ReadCatalog,
) -> Result<HashMap<Name, Value>, Fallback> {
    let mut bound = HashMap::with_capacity(plans.len());
    for plan in plans {
        let value = match given.get(plan.name.as_str()) {
            Some(json) => input(&plan.ty, json, catalog)?,
            None => match &plan.default {
                Some(default) => default.clone(),
                None if plan.ty.is_nullable() => Value::Null,
                None => return Err(Fallback),
            },
        };
        bound.insert(plan.name.clone(), value);
    }
    Ok(bound)
}

/// A JSON input value of type `ty`, coerced as the executor coerces variables.
fn input(ty: &TypeExpr, json: &Json, catalog: &ReadCatalog) -> Result<Value, Fallback> {
    if json.is_null() {
        return if ty.is_nullable() {
            Ok(Value::Null)
        } else {
            Err(Fallback)
        };
    }
    match ty {
        TypeExpr::List { item, .. } => match json {
            Json::Array(items) => items
                .iter()
                .map(|item_json| input(item, item_json, catalog))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::List),
            // A single value where a list is expected is a list of one.
            single => Ok(Value::List(vec![input(item, single, catalog)?])),
        },
        TypeExpr::Named { name, .. } => match catalog.kind(name) {
            Some(Kind::Scalar) => Scalar::named(name)
                .and_then(|scalar| scalar.input(json))
                .ok_or(Fallback),
            Some(Kind::Enum) => {
                let text = json.as_str().ok_or(Fallback)?;
                let known = catalog.enums.get(name).is_some_and(|v| v.contains(text));
                known.then(|| Value::Enum(Name::new(text))).ok_or(Fallback)
            }
            Some(Kind::Input) => input_object(name, json, catalog),
            _ => Err(Fallback),
        },
    }
}

fn input_object(name: &str, json: &Json, catalog: &ReadCatalog) -> Result<Value, Fallback> {
    let given = json.as_object().ok_or(Fallback)?;
    let def = catalog.inputs.get(name).ok_or(Fallback)?;
    if given
        .keys()
        .any(|key| !def.fields.iter().any(|field| field.name == *key))
    {
        return Err(Fallback);
    }
    let mut object =
        Value::from_json(Json::Object(serde_json::Map::new())).map_err(|_| Fallback)?;
    let Value::Object(fields) = &mut object else {
        return Err(Fallback);
    };
    for field in &def.fields {
        let value = match given.get(&field.name) {
            Some(json) => input(&field.ty, json, catalog)?,
            None => match &field.default {
                Some(default) => Value::from_json(default.clone()).map_err(|_| Fallback)?,
                None if field.ty.is_nullable() => continue,
                None => return Err(Fallback),
            },
        };
        fields.insert(Name::new(&field.name), value);
    }
    Ok(object)
}

/// A root field's arguments with variables substituted and the schema's defaults applied.
fn root_arguments(
    declared: &[ArgDef],
    written: &[(String, async_graphql_value::Value)],
    variables: &HashMap<Name, Value>,
) -> Result<HashMap<String, Value>, Fallback> {
    let mut arguments = HashMap::with_capacity(declared.len());
    for def in declared {
        if let Some(default) = &def.default {
            arguments.insert(
                def.name.clone(),
                Value::from_json(default.clone()).map_err(|_| Fallback)?,
            );
        }
    }
    for (name, value) in written {
        let value = value
            .clone()
            .into_const_with(|variable| variables.get(&variable).cloned().ok_or(Fallback))?;
        arguments.insert(name.clone(), value);
    }
    Ok(arguments)
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    write_string(out, key);
    out.push(b':');
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Writes `items` as the GraphQL output of the list type `ty`.
fn write_list(
    out: &mut Vec<u8>,
    items: &[Json],
    ty: &TypeExpr,
    selection: &[FieldPlan],
    catalog: &ReadCatalog,
) -> Result<(), Fallback> {
    let TypeExpr::List { item, .. } = ty else {
        return Err(Fallback);
    };
    out.push(b'[');
    for (index, value) in items.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_value(out, value, item, selection, catalog)?;
    }
    out.push(b']');
    Ok(())
}

/// Writes `value` as the GraphQL output of type `ty`, as the executor's resolvers would.
/// A null where the type forbids one, or data of another type, falls back: the executor
/// then reports it with its path.
fn write_value(
    out: &mut Vec<u8>,
    value: &Json,
    ty: &TypeExpr,
    selection: &[FieldPlan],
    catalog: &ReadCatalog,
) -> Result<(), Fallback> {
    if value.is_null() {
        return if ty.is_nullable() {
            out.extend_from_slice(b"null");
            Ok(())
        } else {
            Err(Fallback)
        };
    }
    match ty {
        TypeExpr::List { .. } => {
            let items = value.as_array().ok_or(Fallback)?;
            write_list(out, items, ty, selection, catalog)
        }
        TypeExpr::Named { name, .. } => match catalog.kind(name) {
            Some(Kind::Object) => write_object(out, value, selection, catalog),
            Some(Kind::Enum) => {
                let text = value.as_str().ok_or(Fallback)?;
                let known = catalog
                    .enums
                    .get(name)
                    .is_some_and(|values| values.contains(text));
                if !known {
                    return Err(Fallback);
                }
                write_string(out, text);
                Ok(())
            }
            _ => write_scalar(out, name, value),
        },
    }
}

fn write_object(
    out: &mut Vec<u8>,
    value: &Json,
    selection: &[FieldPlan],
    catalog: &ReadCatalog,
) -> Result<(), Fallback> {
    out.push(b'{');
    for (index, field) in selection.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_key(out, &field.response_key);
        match &field.output {
            FieldOutput::Typename(name) => write_string(out, name),
            FieldOutput::Data {
                json_key,
                name,
                ty,
                selection,
            } => {
                let child = value
                    .get(json_key)
                    .or_else(|| value.get(name))
                    .unwrap_or(&Json::Null);
                write_value(out, child, ty, selection, catalog)?;
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// A scalar as the executor outputs it; what the executor would refuse falls back.
fn write_scalar(out: &mut Vec<u8>, scalar: &str, value: &Json) -> Result<(), Fallback> {
    let output = Scalar::named(scalar)
        .and_then(|scalar| scalar.output(value))
        .ok_or(Fallback)?;
    output.write(out).map_err(|_| Fallback)
}
