//! `mutation_response` rows: success with an entity, or a failure for the client. Both the
//! seeds' `status` form and FraiseQL 2.x's 13-column `succeeded` form are read.

use super::catalog::ResponseForm;

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The entity as the function returned it, if it did.
    Success {
        entity: Option<serde_json::Value>,
    },
    Failure(Failure),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// `NOT_FOUND`, `FAILED`, `VALIDATION`, …
    pub code: String,
    /// The status as the function wrote it (`not_found:order`, `conflict`).
    pub status: String,
    pub message: String,
    pub detail: Option<serde_json::Value>,
}

/// Statuses of the `status` form that mean the mutation succeeded (`noop:*` included: the
/// database was already as asked).
const SUCCESS_STATUSES: &[&str] = &["success", "ok", "new", "created", "updated", "deleted"];

/// Reads one row, given as `to_jsonb(row)`. An inconsistent row is an error for the operator,
/// not something to guess about.
pub fn interpret(form: ResponseForm, row: &serde_json::Value) -> Result<Outcome, String> {
    let text = |key: &str| row.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let entity = row.get("entity").filter(|e| !e.is_null()).cloned();
    match form {
        ResponseForm::Status => {
            let status = text("status").ok_or("status is null")?;
            let lowered = status.to_ascii_lowercase();
            if SUCCESS_STATUSES.contains(&lowered.as_str()) || lowered.starts_with("noop") {
                return Ok(Outcome::Success { entity });
            }
            let class = lowered.split(':').next().unwrap_or_default();
            Ok(Outcome::Failure(Failure {
                code: class.to_ascii_uppercase(),
                message: text("message").unwrap_or_else(|| status.clone()),
                status,
                detail: row.get("metadata").filter(|m| !m.is_null()).cloned(),
            }))
        }
        ResponseForm::Succeeded => {
            let succeeded = row
                .get("succeeded")
                .and_then(|v| v.as_bool())
                .ok_or("succeeded is null")?;
            let class = text("error_class");
            let state_changed = row.get("state_changed").and_then(|v| v.as_bool()) == Some(true);
            match (succeeded, class) {
                (true, None) => Ok(Outcome::Success { entity }),
                (true, Some(class)) => {
                    Err(format!("succeeded is true but error_class is `{class}`"))
                }
                (false, None) => Err("succeeded is false but error_class is null".into()),
                (false, Some(_)) if state_changed => {
                    Err("succeeded is false but state_changed is true".into())
                }
                (false, Some(class)) => {
                    let status = match text("status_detail") {
                        Some(detail) => format!("{class}:{detail}"),
                        None => class.clone(),
                    };
                    Ok(Outcome::Failure(Failure {
                        code: class.to_ascii_uppercase(),
                        message: text("message").unwrap_or_else(|| class.clone()),
                        status,
                        detail: row.get("error_detail").filter(|d| !d.is_null()).cloned(),
                    }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_form() {
        let ok = json!({"status": "success", "entity": null, "entity_id": "x"});
        assert_eq!(
            interpret(ResponseForm::Status, &ok),
            Ok(Outcome::Success { entity: None })
        );
        let noop = json!({"status": "noop:unchanged", "entity": {"id": "x"}});
        assert_eq!(
            interpret(ResponseForm::Status, &noop),
            Ok(Outcome::Success {
                entity: Some(json!({"id": "x"}))
            })
        );
        let missing = json!({"status": "not_found:order", "message": "no order with this id"});
        let Ok(Outcome::Failure(failure)) = interpret(ResponseForm::Status, &missing) else {
            panic!("not a failure");
        };
        assert_eq!(failure.code, "NOT_FOUND");
        assert_eq!(failure.status, "not_found:order");
        assert_eq!(failure.message, "no order with this id");
        let failed = json!({"status": "failed:insufficient_stock", "message": null});
        let Ok(Outcome::Failure(failure)) = interpret(ResponseForm::Status, &failed) else {
            panic!("not a failure");
        };
        assert_eq!(
            (failure.code.as_str(), failure.message.as_str()),
            ("FAILED", "failed:insufficient_stock")
        );
        assert!(interpret(ResponseForm::Status, &json!({"status": null})).is_err());
    }

    #[test]
    fn succeeded_form_and_its_invariants() {
        let ok = json!({"succeeded": true, "state_changed": true, "error_class": null, "entity": {"id": 1}});
        assert_eq!(
            interpret(ResponseForm::Succeeded, &ok),
            Ok(Outcome::Success {
                entity: Some(json!({"id": 1}))
            })
        );
        let conflict = json!({"succeeded": false, "state_changed": false, "error_class": "conflict",
                              "status_detail": "duplicate", "message": "exists", "error_detail": {"field": "identifier"}});
        let Ok(Outcome::Failure(failure)) = interpret(ResponseForm::Succeeded, &conflict) else {
            panic!("not a failure");
        };
        assert_eq!(failure.code, "CONFLICT");
        assert_eq!(failure.status, "conflict:duplicate");
        assert_eq!(failure.detail, Some(json!({"field": "identifier"})));
        for bad in [
            json!({"succeeded": false, "state_changed": true, "error_class": "internal"}),
            json!({"succeeded": false, "state_changed": false, "error_class": null}),
            json!({"succeeded": true, "state_changed": false, "error_class": "conflict"}),
        ] {
            assert!(interpret(ResponseForm::Succeeded, &bad).is_err(), "{bad}");
        }
    }
}
