//! The REST API end to end: a real server on 127.0.0.1 over a real SQLite
//! file (PostgreSQL with `SWITCHYARD_SERVE_TEST_STORE=postgres://...`), a
//! real HTTP client.

mod common;

use std::time::Duration;

use common::{start, tokens, READ, WRITE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchyard_core::{HostInfo, Resolution, TaskId, WaitFor};
use switchyard_serve::{ServeSettings, Server};

const MB: usize = 1024 * 1024;

fn ids(v: &Value) -> Vec<String> {
    v["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks in {v}"))
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_401_403() {
    let api = start(tokens(), MB).await;
    // No header, a wrong token, a malformed header: 401.
    api.expect_error(
        Method::GET,
        "/api/v1/tasks",
        None,
        StatusCode::UNAUTHORIZED,
        "missing bearer token",
    )
    .await;
    let wrong = start(tokens(), MB)
        .await
        .with_token("read-secret-012345678X");
    wrong
        .expect_error(
            Method::GET,
            "/api/v1/tasks",
            None,
            StatusCode::UNAUTHORIZED,
            "invalid bearer token",
        )
        .await;
    let prefix = start(tokens(), MB).await.with_token("read-secret");
    prefix
        .expect_error(
            Method::GET,
            "/api/v1/tasks",
            None,
            StatusCode::UNAUTHORIZED,
            "invalid",
        )
        .await;
    // Unknown routes are behind auth too, and are JSON 404s.
    api.expect_error(
        Method::GET,
        "/api/v1/nope",
        None,
        StatusCode::UNAUTHORIZED,
        "missing",
    )
    .await;

    let read = api.with_token(READ);
    let (s, _) = read.get("/api/v1/tasks").await;
    assert_eq!(s, StatusCode::OK);
    let (s, doc) = read.get("/api/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    read.expect_error(
        Method::GET,
        "/api/v1/nope",
        None,
        StatusCode::NOT_FOUND,
        "no such route",
    )
    .await;
    // A read token on every mutation: 403 naming the token, never a secret.
    for (path, body) in [
        ("/api/v1/tasks", r#"{"handler":"h"}"#),
        ("/api/v1/tasks/batch", r#"{"tasks":[]}"#),
        ("/api/v1/events", r#"{"name":"e"}"#),
        ("/api/v1/cleanup", r#"{"older_than":"7d"}"#),
        ("/api/v1/tasks/retry", r#"{}"#),
    ] {
        let (s, v) = read.post(path, body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("`ci-read`") && m.contains("write scope"), "{m}");
        assert!(!m.contains(READ) && !m.contains(WRITE), "{m}");
    }
    assert!(
        read.get("/api/v1/tasks").await.1["tasks"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was spawned"
    );

    let write = read.with_token(WRITE);
    let id = write.spawn(r#"{"handler":"h"}"#).await;
    let (s, v) = write.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(s, StatusCode::OK, "write implies read: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tokens_is_loopback_only() {
    let store = switchyard_store::open("memory").await.unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let err = Server::bind(store.clone(), ServeSettings::new(any))
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("refusing to listen on 0.0.0.0:0 without API tokens"),
        "{err}"
    );
    let insecure = ServeSettings {
        insecure: true,
        ..ServeSettings::new(any)
    };
    assert!(Server::bind(store.clone(), insecure).await.is_ok());
    let with_tokens = ServeSettings {
        tokens: tokens(),
        ..ServeSettings::new(any)
    };
    assert!(Server::bind(store.clone(), with_tokens).await.is_ok());
    // Without tokens on loopback, every request passes.
    let api = start(Vec::new(), MB).await;
    api.spawn(r#"{"handler":"h"}"#).await;
    // Bad token settings are refused, naming the token but not its secret.
    let short = ServeSettings {
        tokens: vec![switchyard_serve::ApiToken {
            name: "tiny".into(),
            secret: "short".into(),
            scope: switchyard_serve::Scope::Read,
        }],
        ..ServeSettings::new("127.0.0.1:0".parse().unwrap())
    };
    let err = Server::bind(store, short)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("token `tiny`") && !err.contains("short\""),
        "{err}"
    );
    assert_eq!(
        format!("{:?}", tokens()[0]),
        r#"ApiToken { name: "ci-read", secret: "***", scope: Read }"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_bad_json_and_oversize_bodies() {
    let api = start(tokens(), 4096).await.with_token(WRITE);
    let body = r#"{"handler":"orders","input":{"n":1},"idempotency_key":"k1","priority":3,"headers":{"a":"b"}}"#;
    let id = api.spawn(body).await;
    // Same key: the existing task, 200.
    let (s, v) = api.post("/api/v1/tasks", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"task_id": id.to_string(), "created": false}));

    let post = |b: &'static str, needle: &'static str| {
        let api = &api;
        async move {
            api.expect_error(
                Method::POST,
                "/api/v1/tasks",
                Some(b),
                StatusCode::BAD_REQUEST,
                needle,
            )
            .await
        }
    };
    post("{", "not valid JSON").await;
    post("", "body is empty").await;
    post("[1]", "must be an object").await;
    post(r#"{"input":1}"#, "`handler` is missing").await;
    post(r#"{"handler":"h","prio":1}"#, "unknown key `prio`").await;
    post(r#"{"handler":"h","priority":"high"}"#, "`priority`").await;
    post(r#"{"handler":""}"#, "handler").await;
    let big = format!(r#"{{"handler":"h","input":"{}"}}"#, "x".repeat(5000));
    api.expect_error(
        Method::POST,
        "/api/v1/tasks",
        Some(&big),
        StatusCode::PAYLOAD_TOO_LARGE,
        "larger than the limit of 4096 bytes",
    )
    .await;
    // Only the first spawn happened.
    let (_, v) = api.get("/api/v1/tasks").await;
    assert_eq!(ids(&v), [id.to_string()]);
    // The body is JSON whatever the content type says (`curl -d` sends
    // application/x-www-form-urlencoded).
    let resp = api
        .http
        .post(format!("{}/api/v1/tasks", api.base))
        .bearer_auth(WRITE)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"handler":"curl"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_many_is_all_or_nothing() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let (s, v) = api
        .post(
            "/api/v1/tasks/batch",
            r#"{"tasks":[{"handler":"a","input":1},{"handler":"b"}]}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(v["tasks"][0]["created"], true);
    api.expect_error(
        Method::POST,
        "/api/v1/tasks/batch",
        Some(r#"{"tasks":[{"handler":"c"},{"handler":"d","bogus":1}]}"#),
        StatusCode::BAD_REQUEST,
        "task #1: unknown key `bogus`",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/tasks/batch",
        Some(r#"{"task":[]}"#),
        StatusCode::BAD_REQUEST,
        "`tasks` is missing",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/tasks/batch",
        Some(r#"{"tasks":{}}"#),
        StatusCode::BAD_REQUEST,
        "tasks must be a list",
    )
    .await;
    let (_, v) = api.get("/api/v1/tasks").await;
    assert_eq!(ids(&v).len(), 2, "the bad batch spawned nothing: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_combine_and_cursor_pages() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let a1 = api
        .spawn(r#"{"handler":"la","idempotency_key":"first"}"#)
        .await;
    let b1 = api.spawn(r#"{"handler":"lb"}"#).await;
    let a2 = api.spawn(r#"{"handler":"la"}"#).await;
    // a1's step spawns a child and waits for it: a1 is suspended.
    let lease = api.claim("la").await;
    assert_eq!(lease.task_id, a1);
    let mut child = switchyard_core::NewTask::new("lchild", json!(null));
    child.parent = Some(switchyard_core::ParentRef {
        task_id: a1,
        step_id: lease.step_id,
        group: Some("g".into()),
        index: 0,
    });
    let c = api.store.spawn_fenced(&lease, vec![child]).await.unwrap()[0].task_id;
    api.finish(
        lease,
        Resolution::Suspended(WaitFor {
            group: Some("g".into()),
            ..WaitFor::default()
        }),
    )
    .await;
    // b1 completes.
    api.complete("lb", json!("ok")).await;

    let list = |q: &'static str| {
        let api = &api;
        async move {
            let (s, v) = api.get(&format!("/api/v1/tasks{q}")).await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            ids(&v)
        }
    };
    let s = |ids: &[TaskId]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    assert_eq!(list("").await, s(&[c, a2, b1, a1]));
    assert_eq!(list("?handler=la").await, s(&[a2, a1]));
    assert_eq!(list("?state=completed").await, s(&[b1]));
    assert_eq!(list("?state=suspended").await, s(&[a1]));
    assert_eq!(list("?state=running&handler=la").await, s(&[a2, a1]));
    assert_eq!(list("?root=true").await, s(&[a2, b1, a1]));
    assert_eq!(
        list(Box::leak(format!("?parent={a1}").into_boxed_str())).await,
        s(&[c])
    );
    assert_eq!(list("?idempotency_key=first").await, s(&[a1]));
    assert_eq!(list("?finished_after=0").await, s(&[b1]));
    assert!(list("?created_before=0").await.is_empty());
    assert_eq!(
        list("?root=true&handler=la&state=suspended").await,
        s(&[a1])
    );

    // Pages of 1 via next_cursor walk everything once.
    let mut seen = Vec::new();
    let mut path = "/api/v1/tasks?limit=1".to_string();
    loop {
        let (st, v) = api.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        seen.extend(ids(&v));
        match v["next_cursor"].as_str() {
            Some(cur) => path = format!("/api/v1/tasks?limit=1&cursor={cur}"),
            None => break,
        }
        assert!(seen.len() <= 4, "the cursor loops: {seen:?}");
    }
    // The last full page points at a cursor whose next page is empty.
    assert_eq!(seen, s(&[c, a2, b1, a1]));
    let (_, v) = api.get("/api/v1/tasks?limit=2&handler=la").await;
    assert_eq!(v["next_cursor"], a1.to_string());
    let (_, v) = api.get("/api/v1/tasks?limit=3&handler=la").await;
    assert!(v["next_cursor"].is_null(), "a short page is the last");

    for (q, needle) in [
        ("?state=sleeping", "unknown state `sleeping`"),
        ("?limit=0", "`limit`"),
        ("?limit=1001", "from 1 to 1000"),
        ("?colour=red", "unknown query parameter `colour`"),
        ("?root=yes", "`root`"),
        ("?parent=12", "`parent`: `12` is not a task id"),
        ("?cursor=xyz", "`cursor`"),
        ("?created_after=yesterday", "`created_after`"),
        ("?handler=la&handler=lb", "more than once"),
    ] {
        api.expect_error(
            Method::GET,
            &format!("/api/v1/tasks{q}"),
            None,
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }
    let gone = TaskId::new();
    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks?cursor={gone}"),
        None,
        StatusCode::BAD_REQUEST,
        "no task",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detail_cancel_cascade_retry_and_bulk_retry() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let parent = api.spawn(r#"{"handler":"dp"}"#).await;
    let lease = api.claim("dp").await;
    let mut child = switchyard_core::NewTask::new("dc", json!(null));
    child.parent = Some(switchyard_core::ParentRef {
        task_id: parent,
        step_id: lease.step_id,
        group: None,
        index: 0,
    });
    let c = api.store.spawn_fenced(&lease, vec![child]).await.unwrap()[0].task_id;
    let (s, v) = api.get(&format!("/api/v1/tasks/{parent}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["task"]["id"], parent.to_string());
    assert_eq!(v["steps"][0]["state"], "running");
    assert_eq!(v["steps"][0]["attempt"], 1);
    assert_eq!(v["steps"][0]["run"], 1);
    assert_eq!(v["children"][0]["id"], c.to_string());

    api.expect_error(
        Method::GET,
        "/api/v1/tasks/nope",
        None,
        StatusCode::BAD_REQUEST,
        "`nope` is not a task id",
    )
    .await;
    let unknown = TaskId::new();
    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks/{unknown}"),
        None,
        StatusCode::NOT_FOUND,
        &unknown.to_string(),
    )
    .await;
    api.expect_error(
        Method::POST,
        &format!("/api/v1/tasks/{unknown}/cancel"),
        Some(""),
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
    api.expect_error(
        Method::POST,
        &format!("/api/v1/tasks/{parent}/retry"),
        Some(""),
        StatusCode::CONFLICT,
        "running",
    )
    .await;

    // Cancel with cascade: the child is cancelled too.
    let (s, v) = api
        .post(&format!("/api/v1/tasks/{parent}/cancel?cascade=true"), "")
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"cancelled": true})));
    let (_, v) = api.get(&format!("/api/v1/tasks/{c}")).await;
    assert_eq!(v["task"]["state"], "cancelled");
    let (_, v) = api
        .post(&format!("/api/v1/tasks/{parent}/cancel"), "")
        .await;
    assert_eq!(v, json!({"cancelled": false}), "already finished");
    // Retry brings it back.
    let (s, v) = api.post(&format!("/api/v1/tasks/{parent}/retry"), "").await;
    assert_eq!((s, v), (StatusCode::OK, json!({"retried": true})));
    let (_, v) = api.get(&format!("/api/v1/tasks/{parent}")).await;
    assert_eq!(v["task"]["state"], "running");

    // A failed task shows its error with the trace.
    let f1 = api.spawn(r#"{"handler":"bf"}"#).await;
    let f2 = api.spawn(r#"{"handler":"bf"}"#).await;
    let other = api.spawn(r#"{"handler":"bo"}"#).await;
    api.fail("bf", "boom 1").await;
    api.fail("bf", "boom 2").await;
    api.fail("bo", "other").await;
    let (_, v) = api.get(&format!("/api/v1/tasks/{f1}")).await;
    assert_eq!(v["task"]["state"], "failed");
    assert_eq!(v["steps"][0]["error"]["trace"], "Traceback: line 1");
    api.expect_error(
        Method::POST,
        "/api/v1/tasks/retry",
        Some(r#"{"max":0}"#),
        StatusCode::BAD_REQUEST,
        "`max` must be from 1 to 1000",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/tasks/retry",
        Some(r#"{"hander":"bf"}"#),
        StatusCode::BAD_REQUEST,
        "unknown field `hander`",
    )
    .await;
    let (s, v) = api.post("/api/v1/tasks/retry", r#"{"handler":"bf"}"#).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"matched": 2, "retried": 2, "skipped": []}));
    for (id, state) in [(f1, "running"), (f2, "running"), (other, "failed")] {
        let (_, v) = api.get(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(v["task"]["state"], state, "{id}");
    }
    let (_, v) = api
        .post("/api/v1/tasks/retry", r#"{"handler":"bo","max":1}"#)
        .await;
    assert_eq!(v["retried"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_long_poll() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let id = api.spawn(r#"{"handler":"rp","input":{"x":2}}"#).await;
    let (s, v) = api.get(&format!("/api/v1/tasks/{id}/result")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["finished"], false);
    assert_eq!(v["state"], "running");
    let started = std::time::Instant::now();
    let (_, v) = api
        .get(&format!("/api/v1/tasks/{id}/result?wait=300ms"))
        .await;
    assert_eq!(v["finished"], false);
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");

    let read = common::start_on(api.store.clone(), tokens(), MB, None)
        .await
        .with_token(READ);
    let path = format!("/api/v1/tasks/{id}/result?wait=20s");
    let waiter = tokio::spawn(async move { read.get(&path).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the long-poll waits for the outcome");
    let started = std::time::Instant::now();
    api.complete("rp", json!({"y": 4})).await;
    let (s, v) = waiter.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered when the task finished"
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"task_id": id.to_string(), "state": "completed", "finished": true, "result": {"y": 4}, "error": null})
    );

    let f = api.spawn(r#"{"handler":"rf"}"#).await;
    api.fail("rf", "it broke").await;
    let (_, v) = api.get(&format!("/api/v1/tasks/{f}/result?wait=1s")).await;
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["message"], "it broke");
    assert_eq!(v["error"]["kind"], "permanent");

    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks/{id}/result?wait=soon"),
        None,
        StatusCode::BAD_REQUEST,
        "`wait`: `soon` is not a duration",
    )
    .await;
    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks/{id}/result?wait=1h"),
        None,
        StatusCode::BAD_REQUEST,
        "maximum of 300s",
    )
    .await;
    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks/{}/result", TaskId::new()),
        None,
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_emit_get_list_await() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let (s, v) = api
        .post(
            "/api/v1/events",
            r#"{"name":"paid.1","payload":{"amount":3}}"#,
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"stored": true})));
    let (_, v) = api
        .post("/api/v1/events", r#"{"name":"paid.1","payload":"again"}"#)
        .await;
    assert_eq!(v, json!({"stored": false}), "first write wins");
    let (s, v) = api.get("/api/v1/events/paid.1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["payload"], json!({"amount": 3}));
    api.expect_error(
        Method::GET,
        "/api/v1/events/never",
        None,
        StatusCode::NOT_FOUND,
        "no event `never`",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/events",
        Some(r#"{"payload":1}"#),
        StatusCode::BAD_REQUEST,
        "missing field `name`",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/events",
        Some(r#"{"name":""}"#),
        StatusCode::BAD_REQUEST,
        "event name",
    )
    .await;
    let (_, v) = api.get("/api/v1/events?limit=10").await;
    assert_eq!(v["events"][0]["name"], "paid.1");
    api.expect_error(
        Method::GET,
        "/api/v1/events?limit=x",
        None,
        StatusCode::BAD_REQUEST,
        "`limit`",
    )
    .await;

    // Await: at once when emitted, null after the timeout, woken by an emit.
    let (_, v) = api.get("/api/v1/events/paid.1/await?timeout=1s").await;
    assert_eq!(v["event"]["payload"], json!({"amount": 3}));
    let (_, v) = api.get("/api/v1/events/later/await?timeout=200ms").await;
    assert_eq!(v, json!({"event": null}));
    let read = common::start_on(api.store.clone(), tokens(), MB, None)
        .await
        .with_token(READ);
    let waiter =
        tokio::spawn(async move { read.get("/api/v1/events/later/await?timeout=20s").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    api.post("/api/v1/events", r#"{"name":"later","payload":7}"#)
        .await;
    let (s, v) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["event"]["payload"], 7);
    api.expect_error(
        Method::GET,
        "/api/v1/events/x/await?timeout=-1s",
        None,
        StatusCode::BAD_REQUEST,
        "`timeout`",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_cleanup() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    let now = api.store.now().await.unwrap();
    api.store
        .heartbeat(
            &HostInfo {
                id: "host-1".into(),
                pid: 77,
                hostname: "box".into(),
                name: Some("edge-1".into()),
                handlers: vec!["h1".into(), "h2".into()],
                started_at: now,
                last_heartbeat: now,
                language: Some("python".into()),
                slots: Some(16),
                ended_at: None,
                end_reason: None,
            },
            &[],
            30_000,
        )
        .await
        .unwrap();
    api.spawn(r#"{"handler":"h1"}"#).await;
    let claimed = api
        .store
        .claim("host-1", &[("h1".to_string(), 1)], 30_000)
        .await
        .unwrap();
    assert_eq!(claimed.steps.len(), 1);
    let (s, v) = api.get("/api/v1/hosts").await;
    assert_eq!(s, StatusCode::OK);
    let h = &v["hosts"][0];
    assert_eq!(h["steps_in_flight"], 1, "{h}");
    assert_eq!(
        (h["id"].as_str(), h["pid"].as_u64(), h["hostname"].as_str()),
        (Some("host-1"), Some(77), Some("box"))
    );
    assert_eq!(h["handlers"], json!(["h1", "h2"]));
    assert!(h["heartbeat_age_ms"].as_i64().unwrap() >= 0);
    assert_eq!(
        (
            &h["name"],
            &h["state"],
            &h["language"],
            &h["slots"],
            &h["ended_at"]
        ),
        (
            &json!("edge-1"),
            &json!("live"),
            &json!("python"),
            &json!(16),
            &json!(null)
        )
    );
    assert_eq!(v["ended"], json!([]));

    // Hosts that stop or are found dead are listed as ended (and no longer
    // live) for `ended_within`; one that heartbeats again is live again.
    let host = |id: &str| HostInfo {
        id: id.into(),
        pid: 5,
        hostname: "box".into(),
        name: None,
        handlers: vec!["h9".into()],
        started_at: now,
        last_heartbeat: now,
        language: Some("ruby".into()),
        slots: Some(2),
        ended_at: None,
        end_reason: None,
    };
    for id in ["gone-1", "gone-2"] {
        api.store.heartbeat(&host(id), &[], 30_000).await.unwrap();
    }
    api.store.deregister_host("gone-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    api.store.expire_host("gone-2").await.unwrap();
    let (_, v) = api.get("/api/v1/hosts").await;
    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&v["hosts"]), ["host-1"]);
    assert_eq!(
        ids(&v["ended"]),
        ["gone-2", "gone-1"],
        "most recently ended first"
    );
    assert_eq!(
        (&v["ended"][0]["state"], &v["ended"][1]["state"]),
        (&json!("dead"), &json!("stopped"))
    );
    assert_eq!(v["ended"][0]["language"], "ruby");
    assert!(v["ended"][0]["ended_at"].as_i64().unwrap() >= now);
    let (_, v) = api.get("/api/v1/hosts?ended_within=0s").await;
    assert_eq!(v["ended"], json!([]));
    api.expect_error(
        Method::GET,
        "/api/v1/hosts?ended_within=2d",
        None,
        StatusCode::BAD_REQUEST,
        "`ended_within`",
    )
    .await;
    api.store
        .heartbeat(&host("gone-1"), &[], 30_000)
        .await
        .unwrap();
    let (_, v) = api.get("/api/v1/hosts").await;
    assert!(ids(&v["hosts"]).contains(&"gone-1".to_string()), "{v}");
    assert_eq!(ids(&v["ended"]), ["gone-2"]);
    api.store.deregister_host("gone-1").await.unwrap();
    api.store.deregister_host("gone-1").await.unwrap();

    let done = api.spawn(r#"{"handler":"cu"}"#).await;
    let running = api.spawn(r#"{"handler":"cr"}"#).await;
    api.complete("cu", json!(1)).await;
    let (_, v) = api.post("/api/v1/cleanup", r#"{"older_than":"1h"}"#).await;
    assert_eq!(v, json!({"deleted": 0}), "too recent");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, v) = api
        .post("/api/v1/cleanup", r#"{"older_than":"5ms","batch":1}"#)
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"deleted": 1})));
    api.expect_error(
        Method::GET,
        &format!("/api/v1/tasks/{done}"),
        None,
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
    let (s, _) = api.get(&format!("/api/v1/tasks/{running}")).await;
    assert_eq!(s, StatusCode::OK, "unfinished tasks are kept");
    api.expect_error(
        Method::POST,
        "/api/v1/cleanup",
        Some(r#"{"older_than":"soon"}"#),
        StatusCode::BAD_REQUEST,
        "`older_than`: `soon` is not a duration",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/cleanup",
        Some(r#"{"older_than":"1d","batch":0}"#),
        StatusCode::BAD_REQUEST,
        "`batch`",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/cleanup",
        Some("{}"),
        StatusCode::BAD_REQUEST,
        "give `older_than` (tasks), `events_older_than` (events) or both",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/api/v1/cleanup",
        Some(r#"{"events_older_than":"later"}"#),
        StatusCode::BAD_REQUEST,
        "`events_older_than`: `later` is not a duration",
    )
    .await;
    // Event retention is opt-in: only `events_older_than` deletes events.
    api.post("/api/v1/events", r#"{"name":"cu.old"}"#).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_, v) = api.post("/api/v1/cleanup", r#"{"older_than":"5ms"}"#).await;
    assert_eq!(v, json!({"deleted": 0}), "{v}");
    let (s, _) = api.get("/api/v1/events/cu.old").await;
    assert_eq!(s, StatusCode::OK, "events are kept by a task cleanup");
    let (s, v) = api
        .post(
            "/api/v1/cleanup",
            r#"{"events_older_than":"5ms","batch":1}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["deleted"], 0);
    assert!(v["events_deleted"].as_u64().unwrap() >= 1, "{v}");
    api.expect_error(
        Method::GET,
        "/api/v1/events/cu.old",
        None,
        StatusCode::NOT_FOUND,
        "cu.old",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_by_prefix_and_handlers() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    for name in ["order.1", "order.2", "pay.1", "order%"] {
        api.post("/api/v1/events", &format!(r#"{{"name":"{name}"}}"#))
            .await;
    }
    let names = |q: &'static str| {
        let api = &api;
        async move {
            let (s, v) = api.get(&format!("/api/v1/events{q}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names("?prefix=order.").await, ["order.2", "order.1"]);
    assert_eq!(names("?prefix=order%25").await, ["order%"], "plain text");
    assert_eq!(names("?prefix=order&limit=1").await, ["order%"]);
    assert_eq!(names("").await.len(), 4);
    api.expect_error(
        Method::GET,
        "/api/v1/events?prefix=",
        None,
        StatusCode::BAD_REQUEST,
        "`prefix` is empty",
    )
    .await;

    // Handlers: from steps and from registered hosts.
    let now = api.store.now().await.unwrap();
    api.store
        .heartbeat(
            &HostInfo {
                id: "host-9".into(),
                pid: 1,
                hostname: "box".into(),
                name: None,
                handlers: vec!["ha".into(), "idle".into()],
                started_at: now,
                last_heartbeat: now,
                language: None,
                slots: None,
                ended_at: None,
                end_reason: None,
            },
            &[],
            30_000,
        )
        .await
        .unwrap();
    for _ in 0..3 {
        api.spawn(r#"{"handler":"ha"}"#).await;
    }
    api.spawn(r#"{"handler":"hb"}"#).await;
    api.fail("hb", "no").await;
    let _running = api.claim("ha").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (s, v) = api.get("/api/v1/handlers").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let hs = v["handlers"].as_array().unwrap();
    let names: Vec<&str> = hs.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ha", "hb", "idle"]);
    let ha = &hs[0];
    assert_eq!(
        (ha["ready"].as_u64(), ha["running"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(ha["hosts"], json!(["host-9"]));
    assert!(ha["oldest_ready_age_ms"].as_i64().unwrap() >= 30, "{ha}");
    assert_eq!(hs[1]["failed"], 1);
    assert!(hs[1]["oldest_ready_age_ms"].is_null());
    assert_eq!(hs[1]["hosts"], json!([]));
    assert_eq!(
        (hs[2]["ready"].as_u64(), hs[2]["hosts"].clone()),
        (Some(0), json!(["host-9"]))
    );
}

/// Stopping the server answers the long-polls in flight at once (with what
/// they have) instead of holding the shutdown for their whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_long_polls() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite:{}", dir.path().join("s.db").display());
    let store = switchyard_store::open(&url).await.unwrap();
    let server = Server::bind(
        store.clone(),
        ServeSettings::new("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let base = format!("http://{}", server.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let id = switchyard_core::Client::new(store)
        .spawn("slow", json!(null))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let poll = |path: String| {
        let http = http.clone();
        tokio::spawn(async move {
            let r = http.get(path).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    let result = poll(format!("{base}/api/v1/tasks/{id}/result?wait=120s"));
    let event = poll(format!("{base}/api/v1/events/never/await?timeout=120s"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    tx.send(()).unwrap();
    let (s, v) = result.await.unwrap();
    assert_eq!(
        (s, v["finished"].clone(), v["state"].clone()),
        (StatusCode::OK, json!(false), json!("running"))
    );
    let (s, v) = event.await.unwrap();
    assert_eq!((s, v), (StatusCode::OK, json!({"event": null})));
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_failure_groups_and_group_retry() {
    let api = start(tokens(), MB).await.with_token(WRITE);
    for _ in 0..3 {
        api.spawn(r#"{"handler":"pay"}"#).await;
    }
    api.spawn(r#"{"handler":"pay"}"#).await;
    let done = api.spawn(r#"{"handler":"ok"}"#).await;
    let gone = api.spawn(r#"{"handler":"bye"}"#).await;
    for _ in 0..2 {
        api.fail("pay", "card declined").await;
    }
    let other = api.fail("pay", "timeout").await;
    api.complete("ok", json!(1)).await;
    let (s, _) = api.post(&format!("/api/v1/tasks/{gone}/cancel"), "").await;
    assert_eq!(s, StatusCode::OK);

    // Counts by handler and state; finished per minute over the last hour.
    let (s, v) = api.get("/api/v1/stats").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["bucket_ms"], 60_000);
    assert_eq!(
        v["now"].as_i64().unwrap() - v["since"].as_i64().unwrap(),
        3_600_000
    );
    let count = |h: &str, st: &str| {
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["handler"] == h && c["state"] == st)
            .map(|c| c["count"].as_u64().unwrap())
    };
    assert_eq!(count("pay", "failed"), Some(3));
    assert_eq!(count("pay", "running"), Some(1));
    assert_eq!(count("ok", "completed"), Some(1));
    assert_eq!(count("bye", "cancelled"), Some(1));
    assert_eq!(count("bye", "failed"), None, "cancelled is not failed");
    let finished = |st: &str| {
        v["finished"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["state"] == st)
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        (
            finished("completed"),
            finished("failed"),
            finished("cancelled")
        ),
        (1, 3, 1)
    );
    let (_, v) = api.get("/api/v1/stats?window=10m&bucket=10s").await;
    assert_eq!(v["bucket_ms"], 10_000);
    for (q, needle) in [
        ("bucket=500ms", "at least 1s"),
        ("window=1h&bucket=1s", "more than 1440 buckets"),
        ("window=2d", "longer than the maximum"),
        ("bogus=1", "unknown query parameter `bogus`"),
    ] {
        api.expect_error(
            Method::GET,
            &format!("/api/v1/stats?{q}"),
            None,
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }

    // Failure groups, largest first.
    let (s, v) = api.get("/api/v1/failures").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let groups: Vec<(String, String, u64)> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["handler"].as_str().unwrap().to_string(),
                g["message"].as_str().unwrap().to_string(),
                g["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("pay".into(), "card declined".into(), 2),
            ("pay".into(), "timeout".into(), 1)
        ]
    );
    let (_, v) = api.get("/api/v1/failures?limit=1").await;
    assert_eq!(v["groups"].as_array().unwrap().len(), 1);
    api.expect_error(
        Method::GET,
        "/api/v1/failures?limit=0",
        None,
        StatusCode::BAD_REQUEST,
        "`limit`",
    )
    .await;

    // Retry one group: only its tasks, the count reported; a read token
    // may not.
    let read = start(tokens(), MB).await.with_token(READ);
    read.expect_error(
        Method::POST,
        "/api/v1/tasks/retry",
        Some(r#"{"handler":"pay","message":"card declined"}"#),
        StatusCode::FORBIDDEN,
        "write scope",
    )
    .await;
    let (s, v) = api
        .post(
            "/api/v1/tasks/retry",
            r#"{"handler":"pay","message":"card declined"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["matched"].as_u64(), v["retried"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, v) = api.get("/api/v1/failures").await;
    assert_eq!(
        v["groups"],
        json!([{"handler": "pay", "message": "timeout", "count": 1,
                "last_failed_at": v["groups"][0]["last_failed_at"]}])
    );
    let (_, t) = api.get(&format!("/api/v1/tasks/{other}")).await;
    assert_eq!(
        t["task"]["state"], "failed",
        "the other group is left alone"
    );
    let (_, v) = api
        .post(
            "/api/v1/tasks/retry",
            r#"{"handler":"pay","message":"no such message"}"#,
        )
        .await;
    assert_eq!(v["matched"], 0);
    let (_, t) = api.get(&format!("/api/v1/tasks/{done}")).await;
    assert_eq!(t["task"]["state"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_assets_without_token_with_csp_and_caching() {
    let api = start(tokens(), MB).await;
    let http = reqwest::Client::new();
    for (path, ty, needle) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/assets/app.js\">",
        ),
        ("/assets/app.js", "text/javascript; charset=utf-8", "import"),
        (
            "/assets/api.js",
            "text/javascript; charset=utf-8",
            "/api/v1",
        ),
        ("/assets/style.css", "text/css; charset=utf-8", "body"),
        ("/assets/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}: no token needed");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], ty, "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(
            !csp.contains("http") && !csp.contains('*') && !csp.contains("unsafe"),
            "no remote origin, no inline script: {csp}"
        );
        assert_eq!(h["cache-control"], "no-cache");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let etag = h["etag"].to_str().unwrap().to_string();
        assert!(r.text().await.unwrap().contains(needle), "{path}");
        let again = http
            .get(format!("{}{path}", api.base))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    }
    let r = http
        .get(format!("{}/assets/secrets.js", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The data still needs a token.
    let (s, _) = api.get("/api/v1/stats").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
