//! Bearer-token authentication with `read` and `write` scopes.
//!
//! GET and HEAD need `read` (or `write`); every other method needs `write`.
//! The presented secret is compared with every configured token in
//! constant time (`subtle`), so the time taken does not tell how much of a
//! secret matched. Logs name the token, never its secret.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::{AppState, Scope};

/// `a == b` in time that depends only on the longer length: both are
/// compared zero-padded to that length, and the lengths separately, so
/// neither the content nor a length mismatch ends the comparison early.
fn ct_equal(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut pa = vec![0u8; n];
    let mut pb = vec![0u8; n];
    pa[..a.len()].copy_from_slice(a);
    pb[..b.len()].copy_from_slice(b);
    let same_len = (a.len() as u64).ct_eq(&(b.len() as u64));
    bool::from(pa.ct_eq(&pb) & same_len)
}

/// The token a request presented, if any matched.
fn find<'a>(state: &'a AppState, presented: &[u8]) -> Option<&'a crate::ApiToken> {
    let mut found = None;
    // Every token is compared (no early exit), each in constant time.
    for t in state.tokens.iter() {
        if ct_equal(t.secret.as_bytes(), presented) {
            found = Some(t);
        }
    }
    found
}

/// The middleware: 401 without a valid token, 403 for a read token on a
/// mutation. With no tokens configured every request passes.
pub async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|s| s.trim().as_bytes().to_vec());
    let Some(presented) = presented else {
        return ApiError::unauthorized(
            "missing bearer token: send `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    let Some(token) = find(&state, &presented) else {
        return ApiError::unauthorized("invalid bearer token").into_response();
    };
    let mutation = !matches!(*req.method(), Method::GET | Method::HEAD);
    if mutation && token.scope != Scope::Write {
        tracing::info!(token = %token.name, method = %req.method(), path = %req.uri().path(), "refused: read-only token");
        return ApiError::forbidden(format!(
            "token `{}` has the read scope: {} {} needs the write scope",
            token.name,
            req.method(),
            req.uri().path()
        ))
        .into_response();
    }
    tracing::debug!(token = %token.name, method = %req.method(), path = %req.uri().path(), "request");
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::ct_equal;

    #[test]
    fn constant_time_equality() {
        assert!(ct_equal(b"secret-token", b"secret-token"));
        assert!(ct_equal(b"", b""));
        assert!(!ct_equal(b"secret-token", b"secret-tokem"));
        assert!(
            !ct_equal(b"secret-token", b"secret-token\0"),
            "zero padding is not equality"
        );
        assert!(!ct_equal(b"secret", b"secret-token"));
        assert!(!ct_equal(b"secret-token", b""));
    }
}
