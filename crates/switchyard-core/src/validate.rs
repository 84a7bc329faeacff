//! Input checks every language shares: names, durations given in seconds,
//! deadlines, payload sizes, JSON text. Each refuses with
//! [`Error::InvalidInput`] (or [`Error::PayloadTooLarge`]) naming what was
//! wrong; none panics on any input. (Also reachable as `client::*`.)

use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Millis;

/// Default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Longest handler or event name.
pub const MAX_NAME_LEN: usize = 256;

/// Checks a handler, step or event name: non-empty, at most
/// [`MAX_NAME_LEN`] bytes, no control characters.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::InvalidInput(format!("{what} must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidInput(format!(
            "{what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "{what} `{}` contains control characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// Longest duration accepted anywhere a user gives one (await timeouts,
/// sleeps, handler timeouts, linger, backoff, lease, grace periods, waits):
/// 100 years of 365.25 days. Longer ones are refused with
/// [`Error::InvalidInput`]; they would overflow the stored millisecond
/// deadlines (or panic in `Duration::from_secs_f64`) and mean "never"
/// anyway.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000);

/// Turns a number of seconds given by a user (every binding's timeouts and
/// sleeps) into a [`Duration`], refusing what cannot be one: NaN, infinite,
/// negative, or longer than [`MAX_DURATION`]. The error is
/// [`Error::InvalidInput`] naming `what` and the value.
pub fn duration_from_secs(what: &str, secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(Error::InvalidInput(format!(
            "{what} must be a non-negative number of seconds, got {secs}"
        )));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(Error::InvalidInput(format!(
            "{what} must be at most 100 years ({} s), got {secs}",
            MAX_DURATION.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A delay hint given in seconds (a `retry_after`, a `Retry-After`
/// header) where a bad value is ignored rather than refused: `None` for NaN
/// or negative, at most [`MAX_DURATION`] (infinite included). Never panics.
pub fn hint_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_DURATION.as_secs_f64()),
    ))
}

/// Refuses a [`Duration`] longer than [`MAX_DURATION`] with
/// [`Error::InvalidInput`] naming `what` (Rust callers can pass
/// `Duration::MAX`).
pub fn check_duration(what: &str, d: Duration) -> Result<Duration> {
    if d > MAX_DURATION {
        return Err(Error::InvalidInput(format!(
            "{what} must be at most 100 years ({} s), got {} s",
            MAX_DURATION.as_secs(),
            d.as_secs()
        )));
    }
    Ok(d)
}

/// `now + d` in store milliseconds, refusing `d` over [`MAX_DURATION`] and
/// any overflow with [`Error::InvalidInput`] naming `what`.
pub fn deadline_after(what: &str, now: Millis, d: Duration) -> Result<Millis> {
    let d = check_duration(what, d)?;
    i64::try_from(d.as_millis())
        .ok()
        .and_then(|ms| now.checked_add(ms))
        .ok_or_else(|| {
            Error::InvalidInput(format!("{what} of {} s overflows the clock", d.as_secs()))
        })
}

struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Size of `v` as compact JSON.
pub fn json_size(v: &Value) -> usize {
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Rejects a payload over `limit` bytes with [`Error::PayloadTooLarge`].
pub fn check_size(what: &str, v: &Value, limit: usize) -> Result<()> {
    // Small scalars cannot exceed any sensible limit; skip the walk.
    if matches!(v, Value::Null | Value::Bool(_) | Value::Number(_)) {
        return Ok(());
    }
    let size = json_size(v);
    if size > limit {
        return Err(Error::PayloadTooLarge {
            what: what.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// Parses JSON text given by a user, naming `what` in the error.
pub fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::InvalidInput(format!("{what} is not valid JSON: {e}")))
}
