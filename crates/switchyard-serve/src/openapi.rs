//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes and the schema types in [`crate::api`]. The committed copy
//! `crates/switchyard-serve/openapi.json` is checked against it by
//! `tests/openapi.rs` (regenerate with
//! `SWITCHYARD_WRITE_OPENAPI=1 cargo test -p switchyard-serve --test openapi`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api;
use crate::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard REST API", description = "Tasks, events, hosts and cleanup over a Switchyard store. Every route needs `Authorization: Bearer <token>` when tokens are configured: GET needs the read scope, everything else the write scope."),
    paths(
        api::list_tasks, api::get_task, api::spawn_task, api::spawn_many, api::cancel_task,
        api::retry_task, api::bulk_retry, api::task_result, api::emit_event, api::list_events,
        api::get_event, api::await_event, api::list_hosts, api::list_handlers, api::stats,
        api::failure_groups, api::cleanup,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Bearer),
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document served at `/api/v1/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // The version is the API's, not the crate's: a crate release must not
    // look like an API change in the committed copy.
    doc.info.version = "1".into();
    doc
}

/// The document as the committed file holds it (pretty JSON, newline).
pub fn document_json() -> String {
    let mut s = doc_string();
    s.push('\n');
    s
}

fn doc_string() -> String {
    serde_json::to_string_pretty(&document()).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
