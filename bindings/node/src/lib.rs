//! napi-rs glue for the `switchyard` npm package: conversion plus one call
//! into the core. The idiomatic TypeScript API (classes, error classes,
//! `AbortSignal`, Promise handlers) lives in `typescript/src/`.
//!
//! Values cross the boundary as JSON text: V8's `JSON.parse`/`JSON.stringify`
//! are faster than building objects through N-API one property at a time,
//! and a value that cannot be serialised fails only its own step.
//!
//! Every entry point that waits on the core is `async` (a Promise in JS), so
//! the JS thread stays free to run the handlers the core calls into.
//! Fallible core calls resolve to an envelope (`{"ok": value}` or
//! `{"err": {"class", "message", ...}}`, see [`errors`]) that the TypeScript
//! side turns into its error classes; the class is the core's
//! ([`switchyard_core::bridge::ErrorClass`]).
//!
//! Thread affinity: `#[napi]` functions run on the JS thread of the calling
//! environment (main thread or a `worker_threads` Worker); `async` bodies run
//! on napi-rs's shared tokio runtime.

mod client;
mod context;
mod errors;
mod worker;

use napi_derive::napi;

/// The version of the native addon (the crate version).
#[napi]
pub fn native_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Checks a store URL without opening it ([`switchyard_store::check_url`]),
/// as an envelope: `{"ok": null}` or the error (`ConfigError`).
#[napi]
pub fn check_store_url(url: String) -> String {
    errors::core(switchyard_store::check_url(&url))
}

/// The core's fan-out plan ([`switchyard_core::bridge::fan_out`]) as an
/// envelope: `{"ok": {"steps": [...], "final_step": name}}`.
#[napi]
pub fn fan_out(
    handler: String,
    total: i64,
    batch_size: i64,
    input_json: String,
    converge: String,
) -> String {
    match errors::parse_env("fanOut input", &input_json) {
        Ok(input) => errors::core(switchyard_core::bridge::fan_out(
            &handler, total, batch_size, input, &converge,
        )),
        Err(e) => e,
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
