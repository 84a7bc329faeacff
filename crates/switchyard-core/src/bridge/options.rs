//! Handler options as the bindings pass them, checked in one place.

use std::time::Duration;

use crate::handler::*;

/// Which capability a foreign handler has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Plain: one item, answered with a value.
    Step,
    /// Decision: one item, answered with a [`Decision`].
    Decision,
    /// API-shaped: one item, answered with a value or an [`ApiError`].
    Api,
    /// Batchable: many items, one answer each.
    Batch,
}

impl JobKind {
    /// The kind by its name in the bindings: `step`, `batch`, `decision`,
    /// `api`.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "step" => Ok(Self::Step),
            "batch" => Ok(Self::Batch),
            "decision" => Ok(Self::Decision),
            "api" => Ok(Self::Api),
            other => Err(format!(
                "unknown handler kind `{other}` (expected step, batch, decision or api)"
            )),
        }
    }

    /// Its name in the bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Batch => "batch",
            Self::Decision => "decision",
            Self::Api => "api",
        }
    }
}

/// A handler's options as the foreign bindings take them (durations in
/// seconds; `None` is the default), checked in one place so every language
/// accepts and refuses the same things with the same messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandlerSpec {
    /// Steps of this handler at once in the host (default: the host's).
    pub concurrency: Option<usize>,
    /// Per-attempt timeout.
    pub timeout: Option<f64>,
    /// Attempts before the step fails for good.
    pub max_attempts: Option<u32>,
    /// First retry delay.
    pub initial_backoff: Option<f64>,
    /// Largest retry delay.
    pub max_backoff: Option<f64>,
    /// Batch handlers: most steps per batch.
    pub max_batch: Option<usize>,
    /// Batch handlers: longest wait for a batch to fill.
    pub linger: Option<f64>,
    /// API handlers: sustained starts per second.
    pub rate_limit: Option<f64>,
    /// API handlers: burst of the rate limit (default 1).
    pub burst: Option<u32>,
}

impl HandlerSpec {
    /// The options of handler `handler` of `kind` on a host running
    /// `host_concurrency` steps at once. `field` spells an option's name the
    /// way the binding does (e.g. `maxAttempts` in TypeScript) for messages.
    /// Refuses zero counts, negative or non-finite durations, and options
    /// that do not apply to the kind.
    pub fn build(
        &self,
        handler: &str,
        kind: JobKind,
        host_concurrency: usize,
        field: impl Fn(&'static str) -> String,
    ) -> Result<HandlerOptions, String> {
        let what = |name: &'static str| format!("handler `{handler}`: {}", field(name));
        let bad = |name: &'static str, why: String| format!("{} {why}", what(name));
        let secs = |name: &'static str, v: f64| seconds(&what(name), v);
        let only = |name: &'static str, needed: JobKind| -> Result<(), String> {
            if kind == needed {
                Ok(())
            } else {
                Err(bad(
                    name,
                    format!("applies to {} handlers only", needed.name()),
                ))
            }
        };
        let mut o = HandlerOptions::default().concurrency(host_concurrency);
        if let Some(c) = self.concurrency {
            if c == 0 {
                return Err(bad("concurrency", "must be at least 1".into()));
            }
            o.concurrency = c;
        }
        if let Some(t) = self.timeout {
            o.timeout = Some(secs("timeout", t)?);
        }
        if let Some(m) = self.max_attempts {
            if m == 0 {
                return Err(bad("max_attempts", "must be at least 1".into()));
            }
            o.retry.max_attempts = m;
        }
        if let Some(b) = self.initial_backoff {
            o.retry.initial_backoff = secs("initial_backoff", b)?;
        }
        if let Some(b) = self.max_backoff {
            o.retry.max_backoff = secs("max_backoff", b)?;
        }
        if let Some(b) = self.max_batch {
            only("max_batch", JobKind::Batch)?;
            if b == 0 {
                return Err(bad("max_batch", "must be at least 1".into()));
            }
            o.max_batch = b;
        }
        if let Some(l) = self.linger {
            only("linger", JobKind::Batch)?;
            o.linger = secs("linger", l)?;
        }
        if let Some(b) = self.burst {
            only("burst", JobKind::Api)?;
            if b == 0 {
                return Err(bad("burst", "must be at least 1".into()));
            }
        }
        if let Some(r) = self.rate_limit {
            only("rate_limit", JobKind::Api)?;
            if !(r.is_finite() && r > 0.0) {
                return Err(bad(
                    "rate_limit",
                    format!("must be a positive number of starts per second, got {r}"),
                ));
            }
            o = o.rate_limit(r, self.burst.unwrap_or(1));
        }
        Ok(o)
    }
}

/// A duration given in seconds by a binding: finite, not negative and at
/// most [`crate::client::MAX_DURATION`], or an error naming `what` (the
/// message of [`crate::client::duration_from_secs`]).
pub fn seconds(what: &str, v: f64) -> Result<Duration, String> {
    crate::client::duration_from_secs(what, v).map_err(|e| match e {
        crate::Error::InvalidInput(m) => m,
        other => other.to_string(),
    })
}

/// The one parser of listen addresses (bindings' `health_listen`, the
/// configuration's `*listen` keys, `switchyard serve --listen`; `what` names
/// the option in the error): `host:port` with an IP address, e.g.
/// `127.0.0.1:9464` or `[::1]:0` (port 0 picks a free port).
pub fn listen_address(what: &str, v: &str) -> Result<std::net::SocketAddr, String> {
    v.trim().parse().map_err(|_| {
        format!(
            "{what} must be an address like 127.0.0.1:9464 (an IP address and a port), not {v:?}"
        )
    })
}

/// `max_attempts` → `maxAttempts`, for bindings whose options are camelCase.
pub fn camel_case(name: &'static str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for ch in name.chars() {
        if ch == '_' {
            upper = true;
        } else if upper {
            out.extend(ch.to_uppercase());
            upper = false;
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_addresses_are_ip_and_port() {
        use super::listen_address;
        assert_eq!(listen_address("x", "127.0.0.1:9464").unwrap().port(), 9464);
        assert!(listen_address("x", "[::1]:0").is_ok());
        let e = listen_address("healthListen", "localhost:80").unwrap_err();
        assert!(e.starts_with("healthListen must be an address"), "{e}");
        assert!(listen_address("x", "127.0.0.1").is_err());
        assert!(listen_address("x", "127.0.0.1:99999").is_err());
    }

    use super::*;

    #[test]
    fn handler_specs_are_checked_in_one_place() {
        let spec = HandlerSpec {
            concurrency: Some(3),
            timeout: Some(1.5),
            max_attempts: Some(2),
            max_batch: Some(8),
            linger: Some(0.01),
            ..HandlerSpec::default()
        };
        let o = spec
            .build("h", JobKind::Batch, 64, |f| f.to_string())
            .unwrap();
        assert_eq!(o.concurrency, 3);
        assert_eq!(o.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.retry.max_attempts, 2);
        assert_eq!((o.max_batch, o.linger), (8, Duration::from_millis(10)));
        let d = HandlerSpec::default()
            .build("h", JobKind::Step, 64, |f| f.to_string())
            .unwrap();
        assert_eq!(d.concurrency, 64);

        let err = |spec: HandlerSpec, kind| spec.build("h", kind, 8, camel_case).unwrap_err();
        let e = err(
            HandlerSpec {
                max_batch: Some(8),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert_eq!(e, "handler `h`: maxBatch applies to batch handlers only");
        let e = err(
            HandlerSpec {
                rate_limit: Some(5.0),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert!(e.contains("rateLimit applies to api handlers only"), "{e}");
        let e = err(
            HandlerSpec {
                timeout: Some(-1.0),
                ..Default::default()
            },
            JobKind::Step,
        );
        assert!(
            e.contains("timeout must be a non-negative number of seconds, got -1"),
            "{e}"
        );
        let e = err(
            HandlerSpec {
                max_attempts: Some(0),
                ..Default::default()
            },
            JobKind::Api,
        );
        assert!(e.contains("maxAttempts must be at least 1"), "{e}");
        let e = err(
            HandlerSpec {
                rate_limit: Some(f64::NAN),
                ..Default::default()
            },
            JobKind::Api,
        );
        assert!(e.contains("rateLimit must be a positive number"), "{e}");
        assert_eq!(JobKind::from_name("api"), Ok(JobKind::Api));
        assert!(JobKind::from_name("cron")
            .unwrap_err()
            .contains("unknown handler kind `cron`"));
        assert_eq!(JobKind::Decision.name(), "decision");
    }
}
