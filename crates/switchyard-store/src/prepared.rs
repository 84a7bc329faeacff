//! Inputs of the SQL stores, validated and JSON-encoded before they reach
//! the database (outside SQLite's writer thread or a PostgreSQL
//! transaction), shared by [`crate::sqlite`] and [`crate::postgres`].

use serde::Serialize;
use switchyard_core::{
    Completion, Error, Lease, Millis, NewStep, NewTask, ParentRef, Resolution, Result, StepId,
    TaskId, WaitFor,
};

/// Encodes `v` as JSON; the error names `what`.
pub(crate) fn encode<T: Serialize + ?Sized>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| Error::InvalidInput(format!("{what}: cannot encode as JSON: {e}")))
}

pub(crate) struct PreparedTask {
    pub(crate) task_id: TaskId,
    pub(crate) step_id: StepId,
    pub(crate) handler: String,
    pub(crate) input: String,
    pub(crate) headers: Option<String>,
    pub(crate) priority: i32,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) response_event: Option<String>,
    pub(crate) run_at: Option<Millis>,
    pub(crate) parent: Option<ParentRef>,
}

impl PreparedTask {
    pub(crate) fn new(i: usize, t: NewTask) -> Result<Self> {
        if t.handler.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "tasks[{i}].handler: must not be empty"
            )));
        }
        Ok(Self {
            task_id: TaskId::new(),
            step_id: StepId::new(),
            input: encode(&format!("tasks[{i}].input"), &t.input)?,
            headers: if t.headers.is_empty() {
                None
            } else {
                Some(encode("headers", &t.headers)?)
            },
            handler: t.handler,
            priority: t.priority,
            idempotency_key: t.idempotency_key,
            response_event: t.response_event,
            run_at: t.run_at,
            parent: t.parent,
        })
    }
}

pub(crate) struct PreparedStep {
    pub(crate) id: StepId,
    pub(crate) name: String,
    pub(crate) handler: String,
    pub(crate) input: String,
    /// Distinct dependencies.
    pub(crate) deps: Vec<String>,
    /// `depends_on` as given, NULL when empty.
    pub(crate) deps_json: Option<String>,
    /// Its routes, NULL when it has none.
    pub(crate) routes_json: Option<String>,
}

pub(crate) enum Prepared {
    Completed {
        result: String,
    },
    Decided {
        steps: Vec<PreparedStep>,
        final_step: Option<String>,
        result: String,
        /// The status recorded with the step.
        status: Option<String>,
    },
    Retry {
        error: String,
        run_at: Millis,
    },
    Failed {
        error: String,
    },
    Suspended {
        wait: WaitFor,
        json: String,
    },
    Released,
}

pub(crate) fn prepare_completion(c: Completion) -> Result<(Lease, Prepared)> {
    let prepared = match c.resolution {
        Resolution::Completed(v) => Prepared::Completed {
            result: encode("result", &v)?,
        },
        Resolution::Decided {
            steps,
            final_step,
            result,
            status,
        } => Prepared::Decided {
            steps: prepare_decision(steps, final_step.as_deref())?,
            final_step,
            result: encode("result", &result)?,
            status,
        },
        Resolution::Retry { error, run_at } => Prepared::Retry {
            error: encode("error", &error)?,
            run_at,
        },
        Resolution::Failed(e) => Prepared::Failed {
            error: encode("error", &e)?,
        },
        Resolution::Suspended(wait) => Prepared::Suspended {
            json: encode("wait", &wait)?,
            wait,
        },
        Resolution::Released => Prepared::Released,
    };
    Ok((c.lease, prepared))
}

/// The checks a decision needs that do not involve the database: names,
/// self-dependencies, cycles among the new steps and `final_step`.
pub(crate) fn prepare_decision(
    steps: Vec<NewStep>,
    final_step: Option<&str>,
) -> Result<Vec<PreparedStep>> {
    crate::decision::check_shape(&steps, final_step)?;
    steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut deps = Vec::with_capacity(s.depends_on.len());
            for d in &s.depends_on {
                if !deps.contains(d) {
                    deps.push(d.clone());
                }
            }
            Ok(PreparedStep {
                id: StepId::new(),
                input: encode(&format!("steps[{i}].input"), &s.input)?,
                deps_json: if s.depends_on.is_empty() {
                    None
                } else {
                    Some(encode("depends_on", &s.depends_on)?)
                },
                routes_json: if s.routes.is_empty() {
                    None
                } else {
                    Some(encode("routes", &s.routes)?)
                },
                deps,
                name: s.name,
                handler: s.handler,
            })
        })
        .collect()
}
