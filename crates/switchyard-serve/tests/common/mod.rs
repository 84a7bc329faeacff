//! A real server on 127.0.0.1 (port 0) over a real store, and a real HTTP
//! client.
#![allow(dead_code)]

use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use switchyard_core::{
    Completion, DynStore, ErrorInfo, ErrorKind, Lease, Resolution, StepId, TaskId,
};
use switchyard_serve::{ApiToken, Scope, ServeSettings, Server};

pub const READ: &str = "read-secret-0123456789";
pub const WRITE: &str = "write-secret-0123456789";

pub struct Api {
    pub base: String,
    pub store: DynStore,
    pub http: reqwest::Client,
    /// The token sent (None: no Authorization header).
    pub token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn tokens() -> Vec<ApiToken> {
    vec![
        ApiToken {
            name: "ci-read".into(),
            secret: READ.into(),
            scope: Scope::Read,
        },
        ApiToken {
            name: "ci-write".into(),
            secret: WRITE.into(),
            scope: Scope::Write,
        },
    ]
}

/// A server over a fresh SQLite file, or with
/// `SWITCHYARD_SERVE_TEST_STORE=postgres` a fresh database on a throwaway
/// PostgreSQL server (`switchyard_store::pg_server`).
pub async fn start(tokens: Vec<ApiToken>, max_body_bytes: usize) -> Api {
    let (url, dir) = match std::env::var("SWITCHYARD_SERVE_TEST_STORE").as_deref() {
        Ok("postgres") => {
            let url = switchyard_store::pg_server::PgServer::shared()
                .unwrap_or_else(|e| panic!("{e}"))
                .fresh_database()
                .await
                .expect("create a test database");
            (url, None)
        }
        _ => {
            let dir = tempfile::TempDir::new().expect("temp dir");
            let url = format!("sqlite:{}", dir.path().join("api.db").display());
            (url, Some(dir))
        }
    };
    let store = switchyard_store::open(&url).await.expect("open store");
    start_on(store, tokens, max_body_bytes, dir).await
}

pub async fn start_on(
    store: DynStore,
    tokens: Vec<ApiToken>,
    max_body_bytes: usize,
    dir: Option<tempfile::TempDir>,
) -> Api {
    let settings = ServeSettings {
        tokens,
        max_body_bytes,
        ..ServeSettings::new("127.0.0.1:0".parse::<SocketAddr>().unwrap())
    };
    let server = Server::bind(store.clone(), settings).await.expect("bind");
    let addr = server.local_addr().expect("local addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Api {
        base: format!("http://{addr}"),
        store,
        http: reqwest::Client::new(),
        token: None,
        stop: Some(tx),
        _dir: dir,
    }
}

impl Api {
    pub fn with_token(mut self, t: &str) -> Self {
        self.token = Some(t.into());
        self
    }

    /// Sends a request; the answer's status and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: answer is not JSON ({e}): {text}"));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// A 4xx whose JSON error message contains `needle`.
    pub async fn expect_error(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        status: StatusCode,
        needle: &str,
    ) {
        let (s, v) = self.call(method.clone(), path, body).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: error `{msg}` should contain `{needle}`"
        );
        assert!(v["error"]["code"].is_string(), "{v}");
    }

    /// Spawns through the API; the new task's id.
    pub async fn spawn(&self, body: &str) -> TaskId {
        let (s, v) = self.post("/api/v1/tasks", body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["task_id"].as_str().unwrap().parse().unwrap()
    }

    /// Claims one ready step of `handler` as a host would.
    pub async fn claim(&self, handler: &str) -> Lease {
        let batch = self
            .store
            .claim("test-host", &[(handler.to_string(), 1)], 30_000)
            .await
            .expect("claim");
        let s = batch
            .steps
            .first()
            .unwrap_or_else(|| panic!("no ready `{handler}` step"));
        Lease {
            step_id: s.step_id,
            task_id: s.task_id,
            attempt: s.attempt,
            run: s.run,
            host_id: "test-host".into(),
        }
    }

    pub async fn finish(&self, lease: Lease, resolution: Resolution) {
        let out = self
            .store
            .complete(vec![Completion { lease, resolution }])
            .await
            .expect("complete");
        out.into_iter().next().unwrap().expect("completion applied");
    }

    /// Runs one `handler` step to completion with `result`.
    pub async fn complete(&self, handler: &str, result: Value) -> StepId {
        let l = self.claim(handler).await;
        let id = l.step_id;
        self.finish(l, Resolution::Completed(result)).await;
        id
    }

    /// Fails one `handler` step permanently.
    pub async fn fail(&self, handler: &str, message: &str) -> TaskId {
        let l = self.claim(handler).await;
        let id = l.task_id;
        let mut e = ErrorInfo::new(ErrorKind::Permanent, message);
        e.trace = Some("Traceback: line 1".into());
        self.finish(l, Resolution::Failed(e)).await;
        id
    }
}
