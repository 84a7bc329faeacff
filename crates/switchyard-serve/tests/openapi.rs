//! The committed OpenAPI document (`crates/switchyard-serve/openapi.json`)
//! is the one the code generates. After changing the API, regenerate it
//! with `SWITCHYARD_WRITE_OPENAPI=1 cargo test -p switchyard-serve --test openapi`
//! (or `crates/switchyard-serve/check-openapi.sh --write`).

use std::path::PathBuf;

#[test]
fn committed_openapi_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = switchyard_serve::openapi::document_json();
    if std::env::var_os("SWITCHYARD_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with the code: regenerate it with \
         `crates/switchyard-serve/check-openapi.sh --write` and commit it",
        path.display()
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/api/v1/tasks",
        "/api/v1/tasks/{id}",
        "/api/v1/tasks/{id}/result",
        "/api/v1/events/{name}/await",
        "/api/v1/hosts",
        "/api/v1/cleanup",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} is documented");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}
