//! Every answer the server sends matches the schema the OpenAPI document
//! gives for its path, method and status: the documented types, required
//! fields present, no undocumented field. The answers come from a real
//! server over a store with real work in it (a host that checkpoints,
//! spawns a child, waits for an event and fails), so the detail, list,
//! result, event, host and handler answers carry every part they can.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchyard_core::{HandlerOptions, StepError, Worker};

/// Checks `v` against `schema` (a subset of JSON Schema as utoipa writes
/// it: `$ref`, `type` (one or several), `properties`, `required`,
/// `additionalProperties`, `items`, `oneOf`/`anyOf`/`allOf`, `enum`);
/// `at` names the place in errors.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: schema `{r}` is not in the document"));
        }
        return check(doc, target, v, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(doc, s, v, at)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema[key].as_array() {
            let errors: Vec<String> = any
                .iter()
                .filter_map(|s| check(doc, s, v, at).err())
                .collect();
            if errors.len() == any.len() {
                return Err(format!(
                    "{at}: matches none of {key}: {}",
                    errors.join("; ")
                ));
            }
        }
    }
    if let Some(values) = schema["enum"].as_array() {
        if !values.contains(v) {
            return Err(format!("{at}: {v} is not one of {values:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let fits = |t: &str| match t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            _ => false,
        };
        if !types.iter().any(|t| fits(t)) {
            return Err(format!("{at}: {v} is not of type {types:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(required) = schema["required"].as_array() {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    return Err(format!(
                        "{at}: the required field `{r}` is missing from {v}"
                    ));
                }
            }
        }
        let props = schema["properties"].as_object();
        let extra = &schema["additionalProperties"];
        for (k, field) in obj {
            let place = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, field, &place)?,
                None if extra.is_object() => check(doc, extra, field, &place)?,
                None if props.is_some() || extra == &Value::Bool(false) => {
                    return Err(format!("{place}: the field is not in the schema"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The documented schema of the answer to `method template` with `status`.
fn response_schema(doc: &Value, method: &Method, template: &str, status: StatusCode) -> Value {
    let op = &doc["paths"][template][method.as_str().to_lowercase()];
    assert!(op.is_object(), "{method} {template} is not documented");
    let r = &op["responses"][status.as_str()];
    assert!(
        r.is_object(),
        "{method} {template}: status {status} is not documented"
    );
    r["content"]["application/json"]["schema"].clone()
}

struct Checker {
    api: Api,
    doc: Value,
    checked: usize,
}

impl Checker {
    /// Sends the request and checks the answer against the schema of
    /// `template` (the documented path the request is an instance of).
    async fn call(
        &mut self,
        method: Method,
        template: &str,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, v) = self.api.call(method.clone(), path, body).await;
        let schema = response_schema(&self.doc, &method, template, status);
        if let Err(e) = check(&self.doc, &schema, &v, "answer") {
            panic!("{method} {path} ({status}) does not match its documented schema: {e}\n{v:#}");
        }
        self.checked += 1;
        (status, v)
    }

    async fn get(&mut self, template: &str, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, template, path, None).await
    }

    async fn post(&mut self, template: &str, path: &str, body: &str) -> (StatusCode, Value) {
        self.call(Method::POST, template, path, Some(body)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_its_documented_schema() {
    let api = start(tokens(), 1 << 20).await.with_token(WRITE);
    let doc: Value = serde_json::from_str(&switchyard_serve::openapi::document_json()).unwrap();
    // A host whose handlers leave every part a detail can show: a
    // checkpoint, a child, a wait on an event, a failure with a trace.
    let worker = Worker::builder(api.store.clone())
        .name("schemas-host")
        .shutdown_grace(Duration::from_millis(200))
        .step(
            "parent",
            HandlerOptions::default(),
            |input, ctx| async move {
                let n: i64 = ctx.checkpoint("count", || async { Ok(3) }).await?;
                ctx.spawn("child", json!({ "n": n })).await?;
                let paid = ctx.await_event("paid.1", None).await?;
                Ok(json!({ "input": input, "paid": paid }))
            },
        )
        .step(
            "child",
            HandlerOptions::default(),
            |input, _ctx| async move { Ok(input) },
        )
        .step("broken", HandlerOptions::default(), |_, _| async {
            Err(StepError::permanent("it broke"))
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    let mut c = Checker {
        api,
        doc,
        checked: 0,
    };
    let (s, v) = c
        .post(
            "/api/v1/tasks",
            "/api/v1/tasks",
            r#"{"handler":"parent","input":{"order":1},"idempotency_key":"o-1","headers":{"tenant":"t"},"priority":2}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let parent = v["task_id"].as_str().unwrap().to_string();
    let (s, _) = c
        .post(
            "/api/v1/tasks",
            "/api/v1/tasks",
            r#"{"handler":"parent","idempotency_key":"o-1"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "the same key answers the first task");
    let (_, v) = c
        .post("/api/v1/tasks", "/api/v1/tasks", r#"{"handler":"broken"}"#)
        .await;
    let broken = v["task_id"].as_str().unwrap().to_string();
    c.post(
        "/api/v1/tasks/batch",
        "/api/v1/tasks/batch",
        r#"{"tasks":[{"handler":"child","input":1},{"handler":"nobody"}]}"#,
    )
    .await;

    // Wait until the parent is suspended on its event and the broken task
    // failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, d) = c
            .get("/api/v1/tasks/{id}", &format!("/api/v1/tasks/{parent}"))
            .await;
        let (_, b) = c
            .get(
                "/api/v1/tasks/{id}/result",
                &format!("/api/v1/tasks/{broken}/result"),
            )
            .await;
        let waiting = d["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "suspended"));
        if waiting && b["state"] == "failed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {d} {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Reads while the parent waits: detail with checkpoint, child and wait.
    let (_, d) = c
        .get("/api/v1/tasks/{id}", &format!("/api/v1/tasks/{parent}"))
        .await;
    assert!(
        !d["checkpoints"].as_array().unwrap().is_empty()
            && !d["children"].as_array().unwrap().is_empty(),
        "the detail has every part: {d:#}"
    );
    c.get("/api/v1/tasks/{id}", &format!("/api/v1/tasks/{broken}"))
        .await;
    c.get("/api/v1/tasks", "/api/v1/tasks?limit=2").await;
    c.get("/api/v1/tasks", "/api/v1/tasks?state=suspended")
        .await;
    c.get(
        "/api/v1/tasks",
        "/api/v1/tasks?state=failed&handler=broken&root=true",
    )
    .await;
    c.get("/api/v1/tasks", &format!("/api/v1/tasks?parent={parent}"))
        .await;
    c.get(
        "/api/v1/tasks/{id}/result",
        &format!("/api/v1/tasks/{parent}/result?wait=100ms"),
    )
    .await;
    c.get("/api/v1/hosts", "/api/v1/hosts").await;
    c.get("/api/v1/handlers", "/api/v1/handlers").await;
    let (_, st) = c.get("/api/v1/stats", "/api/v1/stats").await;
    assert!(
        !st["tasks"].as_array().unwrap().is_empty()
            && !st["finished"].as_array().unwrap().is_empty(),
        "{st}"
    );
    let (_, f) = c.get("/api/v1/failures", "/api/v1/failures").await;
    assert_eq!(f["groups"][0]["message"], "it broke", "{f}");
    c.get(
        "/api/v1/events/{name}/await",
        "/api/v1/events/paid.1/await?timeout=50ms",
    )
    .await;

    // Writes and what follows them.
    c.post(
        "/api/v1/events",
        "/api/v1/events",
        r#"{"name":"paid.1","payload":{"amount":3}}"#,
    )
    .await;
    c.get("/api/v1/events/{name}", "/api/v1/events/paid.1")
        .await;
    c.get("/api/v1/events", "/api/v1/events?prefix=paid.").await;
    c.get("/api/v1/events/{name}/await", "/api/v1/events/paid.1/await")
        .await;
    let (_, r) = c
        .get(
            "/api/v1/tasks/{id}/result",
            &format!("/api/v1/tasks/{parent}/result?wait=20s"),
        )
        .await;
    assert_eq!(r["state"], "completed", "{r}");
    c.get("/api/v1/tasks/{id}", &format!("/api/v1/tasks/{parent}"))
        .await;
    c.post(
        "/api/v1/tasks/retry",
        "/api/v1/tasks/retry",
        r#"{"handler":"broken","max":10}"#,
    )
    .await;
    c.post(
        "/api/v1/tasks/retry",
        "/api/v1/tasks/retry",
        r#"{"handler":"broken","message":"it broke"}"#,
    )
    .await;
    c.post(
        "/api/v1/tasks/{id}/cancel",
        &format!("/api/v1/tasks/{broken}/cancel?cascade=true"),
        "",
    )
    .await;
    c.post(
        "/api/v1/tasks/{id}/retry",
        &format!("/api/v1/tasks/{broken}/retry"),
        "",
    )
    .await;
    c.post(
        "/api/v1/cleanup",
        "/api/v1/cleanup",
        r#"{"older_than":"7d"}"#,
    )
    .await;
    worker.stop().await;
    c.get("/api/v1/hosts", "/api/v1/hosts").await;

    // Errors have their documented shape too.
    for (method, template, path, body, status) in [
        (
            Method::GET,
            "/api/v1/tasks",
            "/api/v1/tasks?state=bogus",
            None,
            400,
        ),
        (
            Method::GET,
            "/api/v1/tasks/{id}",
            "/api/v1/tasks/not-an-id",
            None,
            400,
        ),
        (
            Method::GET,
            "/api/v1/tasks/{id}",
            "/api/v1/tasks/01890000-0000-7000-8000-000000000000",
            None,
            404,
        ),
        (
            Method::POST,
            "/api/v1/tasks",
            "/api/v1/tasks",
            Some("{"),
            400,
        ),
        (
            Method::GET,
            "/api/v1/events/{name}",
            "/api/v1/events/never",
            None,
            404,
        ),
        (
            Method::GET,
            "/api/v1/stats",
            "/api/v1/stats?bucket=1ms",
            None,
            400,
        ),
        (
            Method::GET,
            "/api/v1/failures",
            "/api/v1/failures?limit=x",
            None,
            400,
        ),
        (
            Method::POST,
            "/api/v1/tasks/{id}/retry",
            &format!("/api/v1/tasks/{parent}/retry"),
            Some(""),
            409,
        ),
    ] {
        let (s, _) = c.call(method, template, path, body).await;
        assert_eq!(s.as_u16(), status, "{path}");
    }
    c.api.token = Some(READ.into());
    let (s, _) = c
        .post("/api/v1/tasks", "/api/v1/tasks", r#"{"handler":"x"}"#)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    c.api.token = None;
    let (s, _) = c.get("/api/v1/tasks", "/api/v1/tasks").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(c.checked >= 35, "{} answers checked", c.checked);
}

#[test]
fn the_checker_refuses_what_does_not_match() {
    let doc = json!({"components": {"schemas": {"T": {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string"}, "n": {"type": ["integer", "null"]}}
    }}}});
    let t = json!({"$ref": "#/components/schemas/T"});
    assert!(check(&doc, &t, &json!({"id": "a", "n": 1}), "x").is_ok());
    assert!(check(&doc, &t, &json!({"id": "a", "n": null}), "x").is_ok());
    assert!(check(&doc, &t, &json!({"n": 1}), "x")
        .unwrap_err()
        .contains("`id` is missing"));
    assert!(check(&doc, &t, &json!({"id": 1}), "x")
        .unwrap_err()
        .contains("not of type"));
    assert!(check(&doc, &t, &json!({"id": "a", "extra": 1}), "x")
        .unwrap_err()
        .contains("x.extra: the field is not in the schema"));
    let list = json!({"type": "array", "items": {"$ref": "#/components/schemas/T"}});
    assert!(check(&doc, &list, &json!([{"id": "a"}, {"id": 2}]), "x")
        .unwrap_err()
        .contains("x[1].id"));
}
