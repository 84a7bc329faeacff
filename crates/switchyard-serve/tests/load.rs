//! 1,000 concurrent requests on loopback against a real server over a real
//! SQLite file (PostgreSQL with `SWITCHYARD_SERVE_TEST_STORE=postgres`):
//! spawns with distinct idempotency keys, task details, listings and event
//! emits, all released at once. Then every answer must have been well
//! formed, every accepted spawn must exist exactly once (with its root
//! step), every stored event must read back, and the server must still
//! answer. No timing is asserted.
//!
//! The server has no load shedding of its own; the one overload answer it
//! documents is 503 `store_unavailable` (a store error). Such an answer is
//! accepted here, but then the request's effect must be all or nothing: a
//! refused spawn exists once, complete, or not at all; a refused emit is
//! stored with its payload or not at all.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::{start, tokens, WRITE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const REQUESTS: usize = 1_000;
const SEEDS: usize = 20;
const HANDLERS: usize = 5;

#[derive(Debug)]
enum Kind {
    Spawn { key: String, handler: String },
    Get { id: String },
    List { handler: String },
    Emit { name: String },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests() {
    let api = start(tokens(), 1024 * 1024).await.with_token(WRITE);
    // Tasks to read while the spawns go on.
    let mut seeds = Vec::new();
    for i in 0..SEEDS {
        let id = api
            .spawn(&json!({"handler": "seed", "input": {"i": i}}).to_string())
            .await;
        seeds.push(id.to_string());
    }

    // One connection per request (no pool reuse), all released together.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let kind = match i % 4 {
            0 => Kind::Spawn {
                key: format!("load-key-{i}"),
                handler: format!("load.h{}", i % HANDLERS),
            },
            1 => Kind::Get {
                id: seeds[i % SEEDS].clone(),
            },
            2 => Kind::List {
                handler: format!("load.h{}", i % HANDLERS),
            },
            _ => Kind::Emit {
                name: format!("load.ev.{i}"),
            },
        };
        let req = match &kind {
            Kind::Spawn { key, handler } => http
                .post(format!("{}/api/v1/tasks", api.base))
                .header("content-type", "application/json")
                .body(
                    json!({"handler": handler, "input": {"i": i}, "idempotency_key": key})
                        .to_string(),
                ),
            Kind::Get { id } => http.get(format!("{}/api/v1/tasks/{id}", api.base)),
            Kind::List { handler } => http.get(format!(
                "{}/api/v1/tasks?handler={handler}&limit=20",
                api.base
            )),
            Kind::Emit { name } => http
                .post(format!("{}/api/v1/events", api.base))
                .header("content-type", "application/json")
                .body(json!({"name": name, "payload": {"i": i}}).to_string()),
        }
        .bearer_auth(WRITE);
        let barrier = barrier.clone();
        set.spawn(async move {
            barrier.wait().await;
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i} ({kind:?}): no answer: {e}"));
            let status = resp.status();
            let text = resp.text().await.expect("body");
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("request {i} ({kind:?}): not JSON ({e}): {text}"));
            (i, kind, status, body)
        });
    }
    let mut answers = Vec::with_capacity(REQUESTS);
    while let Some(r) = set.join_next().await {
        answers.push(r.expect("request task"));
    }
    assert_eq!(answers.len(), REQUESTS);

    // Every answer is well formed; collect what was accepted.
    let mut accepted_spawns: HashMap<String, (String, String)> = HashMap::new(); // key -> (id, handler)
    let mut refused_spawns: Vec<(String, String)> = Vec::new(); // (key, handler)
    let mut stored_events: Vec<(String, usize)> = Vec::new();
    let mut refused_events: Vec<(String, usize)> = Vec::new();
    let mut shed = 0;
    for (i, kind, status, body) in &answers {
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                body["error"]["code"], "store_unavailable",
                "request {i} ({kind:?}): a 503 without the documented code: {body}"
            );
            shed += 1;
            match kind {
                Kind::Spawn { key, handler } => refused_spawns.push((key.clone(), handler.clone())),
                Kind::Emit { name } => refused_events.push((name.clone(), *i)),
                Kind::Get { .. } | Kind::List { .. } => {}
            }
            continue;
        }
        match kind {
            Kind::Spawn { key, handler } => {
                assert_eq!(
                    *status,
                    StatusCode::CREATED,
                    "request {i}: spawn with a fresh key: {body}"
                );
                assert_eq!(body["created"], true, "{body}");
                let id = body["task_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("request {i}: no task_id: {body}"));
                assert!(
                    accepted_spawns
                        .insert(key.clone(), (id.to_string(), handler.clone()))
                        .is_none(),
                    "key {key} accepted twice"
                );
            }
            Kind::Get { id } => {
                assert_eq!(*status, StatusCode::OK, "request {i}: GET {id}: {body}");
                assert_eq!(body["task"]["id"], id.as_str(), "{body}");
            }
            Kind::List { handler } => {
                assert_eq!(*status, StatusCode::OK, "request {i}: list: {body}");
                for t in body["tasks"]
                    .as_array()
                    .unwrap_or_else(|| panic!("request {i}: no tasks: {body}"))
                {
                    assert_eq!(t["handler"], handler.as_str(), "{t}");
                }
            }
            Kind::Emit { name } => {
                assert_eq!(*status, StatusCode::OK, "request {i}: emit {name}: {body}");
                assert_eq!(body["stored"], true, "a fresh event name is stored: {body}");
                stored_events.push((name.clone(), *i));
            }
        }
    }
    eprintln!(
        "{} answers: {} spawns accepted, {} events stored, {shed} refused with 503",
        answers.len(),
        accepted_spawns.len(),
        stored_events.len()
    );

    // Every accepted spawn exists exactly once, under its key, with its
    // root step; a refused one exists complete or not at all.
    for (key, (id, handler)) in &accepted_spawns {
        let (s, v) = api
            .get(&format!("/api/v1/tasks?idempotency_key={key}"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let found: Vec<&str> = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(found, [id.as_str()], "key {key}: the accepted task, once");
        let (s, v) = api.get(&format!("/api/v1/tasks/{id}")).await;
        assert_eq!(s, StatusCode::OK, "accepted task {id} is readable: {v}");
        assert_eq!(v["task"]["handler"], handler.as_str(), "{v}");
        assert_eq!(v["task"]["idempotency_key"], key.as_str(), "{v}");
        assert_eq!(
            v["steps"].as_array().map(Vec::len),
            Some(1),
            "task {id} has its root step: {v}"
        );
    }
    let mut applied_refusals = HashSet::new();
    for (key, _) in &refused_spawns {
        let (_, v) = api
            .get(&format!("/api/v1/tasks?idempotency_key={key}"))
            .await;
        let tasks = v["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 1, "key {key}: at most once: {v}");
        if let Some(t) = tasks.first() {
            let id = t["id"].as_str().unwrap();
            let (s, d) = api.get(&format!("/api/v1/tasks/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{d}");
            assert_eq!(d["steps"].as_array().map(Vec::len), Some(1), "{d}");
            applied_refusals.insert(id.to_string());
        }
    }
    // Nothing else was created: the spawn handlers hold exactly the
    // accepted tasks (and the refusals that were applied), each once.
    let mut listed = Vec::new();
    for h in 0..HANDLERS {
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/tasks?handler=load.h{h}&limit=100");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (s, v) = api.get(&path).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            for t in v["tasks"].as_array().unwrap() {
                listed.push(t["id"].as_str().unwrap().to_string());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
    }
    let listed_set: HashSet<&String> = listed.iter().collect();
    assert_eq!(listed.len(), listed_set.len(), "a task listed twice");
    let expected: HashSet<&String> = accepted_spawns
        .values()
        .map(|(id, _)| id)
        .chain(applied_refusals.iter())
        .collect();
    assert_eq!(
        listed_set, expected,
        "the store holds exactly the accepted spawns"
    );

    // Every stored event reads back with its payload; a refused emit is
    // there whole or not at all.
    for (name, i) in &stored_events {
        let (s, v) = api.get(&format!("/api/v1/events/{name}")).await;
        assert_eq!(s, StatusCode::OK, "stored event {name}: {v}");
        assert_eq!(v["payload"], json!({"i": i}), "{v}");
    }
    for (name, i) in &refused_events {
        let (s, v) = api.get(&format!("/api/v1/events/{name}")).await;
        if s == StatusCode::OK {
            assert_eq!(v["payload"], json!({"i": i}), "{v}");
        } else {
            assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        }
    }

    // The server still answers.
    let (s, v) = api.get("/api/v1/tasks?limit=1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.get("/api/v1/hosts").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.get(&format!("/api/v1/tasks/{}", seeds[0])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}
