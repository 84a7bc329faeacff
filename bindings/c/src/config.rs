//! Workers from the configuration (`switchyard.toml`, `SWITCHYARD_*`), read
//! by the core's one parser, and the store's hosts listing that shows
//! their names.

use std::ffi::c_char;

use switchyard_core::bridge::HostPlan;

use crate::worker::{sy_worker, worker_on};
use crate::*;

/// Creates a worker from the configuration: the file at `path` (NULL: the
/// one named by `SWITCHYARD_CONFIG`, else none), then the `SWITCHYARD_*`
/// environment overrides. Opens the configured store (`store.url`) and
/// takes the `[host]` settings (`name`, `concurrency` (also the number of
/// callback threads), `lease`, `heartbeat`, `shutdown_grace`,
/// `health_listen`). An unknown key, a value of the wrong type or one that
/// cannot work is `SY_CONFIG`, the error naming the key and the file or
/// environment variable; a missing file too.
#[no_mangle]
pub unsafe extern "C" fn sy_worker_new_from_config(
    path: *const c_char,
    worker: *mut *mut sy_worker,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let slot = out("worker", worker)?;
        *slot = std::ptr::null_mut();
        let path = if path.is_null() {
            None
        } else {
            Some(std::path::PathBuf::from(unsafe { text("path", path) }?))
        };
        let config = switchyard_core::Config::load(path.as_deref())?;
        let url = config.store.open_url()?;
        let store = block(async move { switchyard_store::open(&url).await })??;
        *slot = register(
            Kind::Worker,
            worker_on(store, HostPlan::from_config(&config.host)),
        );
        Ok(())
    })
}

/// Stores the hosts registered in the store (running or recently seen:
/// id, name, language, heartbeat, ...) as a JSON array in `workers`
/// (release with `sy_buf_free`).
#[no_mangle]
pub unsafe extern "C" fn sy_client_workers(
    client: *const sy_client,
    workers: *mut sy_buf,
    err: *mut *mut sy_error,
) -> sy_status {
    guard(err, || {
        let slot = buf_out("workers", workers)?;
        let c = unsafe { client_of(client) }?;
        let w = block(async move { c.workers().await })??;
        *slot = json_buf(&w)?;
        Ok(())
    })
}
