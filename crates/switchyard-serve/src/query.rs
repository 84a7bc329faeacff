//! Query-string and duration parsing: unknown or repeated parameters and
//! malformed values are 400s naming the parameter.

use std::time::Duration;

use switchyard_core::{Millis, TaskId};

use crate::error::{ApiError, ApiResult};

/// The query parameters of one request, checked against the allowed names.
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Refuses parameters not in `allowed` and parameters given twice.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&str]) -> ApiResult<Self> {
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{k}` (expected one of: {})",
                    allowed.join(", ")
                )));
            }
            if pairs[..i].iter().any(|(o, _)| o == k) {
                return Err(ApiError::bad_request(format!(
                    "query parameter `{k}` is given more than once"
                )));
            }
        }
        Ok(Self { pairs })
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A non-empty string.
    pub fn string(&self, key: &str) -> ApiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some("") => Err(ApiError::bad_request(format!(
                "query parameter `{key}` is empty"
            ))),
            Some(v) => Ok(Some(v.to_string())),
        }
    }

    /// `true` or `false`.
    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!(
                "query parameter `{key}`: `{v}` is not `true` or `false`"
            ))),
        }
    }

    /// A time: milliseconds since the Unix epoch.
    pub fn millis(&self, key: &str) -> ApiResult<Option<Millis>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse::<Millis>().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "query parameter `{key}`: `{v}` is not a time in milliseconds since the Unix epoch"
                ))
            }),
        }
    }

    /// A whole number in `min..=max`.
    pub fn number(&self, key: &str, min: usize, max: usize) -> ApiResult<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::bad_request(format!(
                    "query parameter `{key}`: `{v}` is not a whole number from {min} to {max}"
                ))),
            },
        }
    }

    /// A task id.
    pub fn task_id(&self, key: &str) -> ApiResult<Option<TaskId>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse::<TaskId>().map(Some).map_err(|_| {
                ApiError::bad_request(format!("query parameter `{key}`: `{v}` is not a task id"))
            }),
        }
    }

    /// A duration (see [`parse_duration`]) of at most `max`.
    pub fn duration(&self, key: &str, max: Duration) -> ApiResult<Option<Duration>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let d = parse_duration(v)
                    .map_err(|m| ApiError::bad_request(format!("query parameter `{key}`: {m}")))?;
                if d > max {
                    return Err(ApiError::bad_request(format!(
                        "query parameter `{key}`: `{v}` is longer than the maximum of {}s",
                        max.as_secs()
                    )));
                }
                Ok(Some(d))
            }
        }
    }
}

/// A duration: a whole number with a unit `ms`, `s`, `m`, `h` or `d`
/// (`500ms`, `30s`, `7d`), or a bare number of seconds (`2.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "`{text}` is not a duration (expected a number with a unit ms, s, m, h or d, e.g. `30s`)"
        )
    };
    if let Ok(secs) = t.parse::<f64>() {
        if (0.0..1e12).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(bad());
    }
    let (number, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        return Err(bad());
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        for bad in [
            "",
            "s",
            "-1s",
            "1.5s",
            "10x",
            "NaN",
            "-3",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
    }
}
