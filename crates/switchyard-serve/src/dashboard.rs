//! The web dashboard: plain HTML, CSS and JavaScript modules embedded in the
//! binary (`crates/switchyard-serve/dashboard/`, no build step), served at
//! `/` and `/assets/...` without authentication (they hold no data: the
//! page asks for a token and sends it with every `/api/v1` call it makes).
//!
//! Every answer has its Content-Type, a Content-Security-Policy that allows
//! only this origin (no remote scripts, styles, images or connections, no
//! inline script), `X-Content-Type-Options: nosniff`, and
//! `Cache-Control: no-cache` with an ETag (the hash of the content), so a
//! browser revalidates with `If-None-Match` and gets a 304 until the binary
//! changes.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// The Content-Security-Policy of every dashboard answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// The embedded files: name under `/assets/`, content type, content.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/api.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/pages.js"),
    ),
    (
        "task.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/task.js"),
    ),
    (
        "ui.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../dashboard/ui.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../dashboard/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../dashboard/favicon.svg"),
    ),
];

const INDEX: &[u8] = include_bytes!("../dashboard/index.html");

/// The dashboard's routes (no authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
}

/// FNV-1a, 64 bits: a stable ETag for embedded content.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

fn answer(req: &HeaderMap, content_type: &'static str, body: &'static [u8]) -> Response {
    let tag = etag(body);
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, body).into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    r
}

async fn index(headers: HeaderMap) -> Response {
    answer(&headers, "text/html; charset=utf-8", INDEX)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => answer(&headers, content_type, body),
        None => {
            let mut r = (StatusCode::NOT_FOUND, "no such asset\n").into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    }
}
