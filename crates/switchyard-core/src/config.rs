//! One configuration for the CLI, `switchyard serve` and every worker host:
//! `switchyard.toml` plus `SWITCHYARD_*` environment variables, read by one
//! parser ([`Config::load`]), and the redaction of secrets
//! ([`Secret`], [`redact_url`]).
//!
//! Where it comes from, later layers winning:
//! 1. defaults ([`Config::default`]);
//! 2. the file named by `--config PATH` (the `path` argument of
//!    [`Config::load`]) or else `SWITCHYARD_CONFIG`; no file is also valid;
//! 3. `SWITCHYARD_STORE`, a shorthand for `store.url`;
//! 4. `SWITCHYARD_<SECTION>__<KEY>` (e.g. `SWITCHYARD_HOST__CONCURRENCY=8`).
//!    Only names with a `__` are read, so the other `SWITCHYARD_*` variables
//!    (`SWITCHYARD_LOG`, `SWITCHYARD_PG_BIN`, ...) are left alone.
//!
//! Unknown keys and values of the wrong type are refused, each error naming
//! the key and the file or environment variable it came from. Durations are
//! strings with a unit (`"500ms"`, `"30s"`, `"2m"`, `"1h"`) or a number of
//! seconds.
//!
//! Secrets (the password in `store.url`, `serve.tokens[].secret`) never
//! appear in this module's output: [`Secret`] prints `***`, the
//! [`Serialize`] form of [`Config`] (what `switchyard config` prints) redacts
//! the store URL, and [`Debug`] does too.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Error, Result};

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SWITCHYARD_CONFIG";
/// The shorthand environment variable for `store.url`.
pub const STORE_ENV: &str = "SWITCHYARD_STORE";
/// The prefix of the per-key environment variables.
pub const ENV_PREFIX: &str = "SWITCHYARD_";
/// The default store URL: an SQLite file in the working directory.
pub const DEFAULT_STORE_URL: &str = "sqlite:switchyard.db";

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

/// A secret string: its [`Debug`], [`Display`](fmt::Display) and
/// [`Serialize`] forms are `***`; [`Secret::expose`] reads it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that needs it (comparing a
    /// bearer token, connecting to a database). Never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Secret(d.deserialize_any(Stringish("a string"))?))
    }
}

/// Accepts a string, or a number or boolean as its text: an environment
/// variable `SWITCHYARD_..=12345` reaches serde as a number.
struct Stringish(&'static str);

impl Visitor<'_> for Stringish {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<String, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
}

fn de_stringish<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(Stringish("a string"))
}

fn de_opt_stringish<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(Some(de_stringish(d)?))
}

/// `text` with every password it carries replaced by `***`: the password of
/// a URL's user information (`postgres://alice:***@host/db`) and the value
/// of every `password=` setting, in a URL's query (`?password=***`) or in a
/// key/value connection string (`host=h password=*** dbname=d`, quoted
/// values included). Keys ending in `password` (e.g. `sslpassword`) count.
/// Use it on every store URL, or text that may contain one, before it
/// reaches output, logs or errors.
pub fn redact_url(text: &str) -> String {
    let with_userinfo = redact_userinfo(text);
    redact_password_settings(&with_userinfo)
}

/// `scheme://user:PASSWORD@host` → `scheme://user:***@host`, for every
/// `://` in `text` (an error message may quote more than one URL).
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first character that cannot be in it
        // unencoded; the user information is what precedes its last `@`.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '`' | '\'' | '"'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Every `...password = VALUE` → `...password=***` (separator kept), where
/// the key starts the text or follows a space, `?`, `&` or `;`, and VALUE
/// is quoted (`'...'`, `"..."`, backslash escapes) or runs to the next
/// space, `&`, `;` or quote.
fn redact_password_settings(text: &str) -> String {
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(KEY) {
        let key_end = search + found + KEY.len();
        search = key_end;
        // The key's first character: letters and `_` before `password`
        // belong to it (`sslpassword`).
        let mut start = key_end - KEY.len();
        while start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            start -= 1;
        }
        let boundary =
            start == 0 || matches!(bytes[start - 1], b' ' | b'\t' | b'\n' | b'?' | b'&' | b';');
        if !boundary {
            continue;
        }
        let mut i = key_end;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let value_start = i;
        if i < bytes.len() && (bytes[i] == b'\'' || bytes[i] == b'"') {
            let quote = bytes[i];
            i += 1;
            while i < bytes.len() && bytes[i] != quote {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len()
                && !matches!(
                    bytes[i],
                    b' ' | b'\t' | b'\n' | b'&' | b';' | b'`' | b'\'' | b'"'
                )
            {
                i += 1;
            }
        }
        if i == value_start {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = i;
        search = i;
    }
    out.push_str(&text[copied..]);
    out
}

// ---------------------------------------------------------------------------
// The schema
// ---------------------------------------------------------------------------

/// The whole configuration (`switchyard.toml`).
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[store]`.
    pub store: StoreConfig,
    /// `[host]`: worker hosts.
    pub host: HostConfig,
    /// `[serve]`: `switchyard serve`.
    pub serve: ServeConfig,
    /// `[log]`.
    pub log: LogConfig,
}

/// How hosts learn of new work made by other processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Wakeup {
    /// Notifications (PostgreSQL LISTEN/NOTIFY) plus a fallback poll every
    /// `poll_interval`: the stores' default.
    Notify,
    /// Polling every `poll_interval` only.
    Poll,
}

/// `[store]`.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The store URL (`memory`, `sqlite:PATH`, `postgres://...`). May carry
    /// a password: printed only through [`redact_url`].
    #[serde(deserialize_with = "de_stringish", serialize_with = "ser_url")]
    pub url: String,
    /// Wake-up mode; `None`: the store's default. Applied to PostgreSQL
    /// stores (`notify` → `?wakeup=hybrid`, `poll` → `?wakeup=polling`);
    /// SQLite and memory stores always wake hosts of their own process at
    /// once and poll for work made by other processes, and ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wakeup: Option<Wakeup>,
    /// Poll period; `None`: the store's default. Applied to PostgreSQL
    /// stores (`?poll_ms=`), ignored by the others.
    #[serde(
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub poll_interval: Option<Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORE_URL.into(),
            wakeup: None,
            poll_interval: None,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("wakeup", &self.wakeup)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

fn ser_url<S: Serializer>(url: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

impl StoreConfig {
    /// The URL to open: [`StoreConfig::url`] with `wakeup` and
    /// `poll_interval` applied to a PostgreSQL URL as its `wakeup=` and
    /// `poll_ms=` parameters. A URL that sets a parameter the configuration
    /// also sets is refused (which one wins would be a guess). Other
    /// stores' URLs are returned as they are.
    pub fn open_url(&self) -> Result<String> {
        let url = self.url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Ok(url.to_string());
        }
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
        let has = |k: &str| query.split('&').any(|p| p.split('=').next() == Some(k));
        let mut extra = Vec::new();
        if let Some(w) = self.wakeup {
            if has("wakeup") {
                return Err(Error::Config(
                    "store.wakeup is set, and so is the store URL's `wakeup` parameter: keep one"
                        .into(),
                ));
            }
            extra.push(format!(
                "wakeup={}",
                match w {
                    Wakeup::Notify => "hybrid",
                    Wakeup::Poll => "polling",
                }
            ));
        }
        if let Some(p) = self.poll_interval {
            if has("poll_ms") {
                return Err(Error::Config(
                    "store.poll_interval is set, and so is the store URL's `poll_ms` parameter: keep one"
                        .into(),
                ));
            }
            extra.push(format!("poll_ms={}", p.as_millis()));
        }
        if extra.is_empty() {
            return Ok(url.to_string());
        }
        let sep = if url.contains('?') { "&" } else { "?" };
        Ok(format!("{url}{sep}{}", extra.join("&")))
    }
}

/// `[host]`: a worker host's settings.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// A name for this host (`None`: none).
    #[serde(
        deserialize_with = "de_opt_stringish",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// Steps running at once in the host (default 64).
    pub concurrency: usize,
    /// Lease length (default 30 s).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub lease: Duration,
    /// Heartbeat period (`None`: a third of the lease, at most 5 s).
    #[serde(
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub heartbeat: Option<Duration>,
    /// How long running steps may finish on shutdown (default 10 s).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Address of the host's `/healthz`, `/readyz` and `/metrics`
    /// (`None`: off; port 0 picks a free port).
    #[serde(
        deserialize_with = "de_opt_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub health_listen: Option<SocketAddr>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            name: None,
            concurrency: 64,
            lease: Duration::from_secs(30),
            heartbeat: None,
            shutdown_grace: Duration::from_secs(10),
            health_listen: None,
        }
    }
}

/// `[serve]`: `switchyard serve`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// REST listen address (`None`: the server's default).
    #[serde(
        deserialize_with = "de_opt_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub listen: Option<SocketAddr>,
    /// gRPC listen address (`None`: no gRPC).
    #[serde(
        deserialize_with = "de_opt_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub grpc_listen: Option<SocketAddr>,
    /// Largest accepted request body (default 1 MiB).
    pub max_body_bytes: usize,
    /// Allow a non-loopback listen address without tokens.
    pub insecure: bool,
    /// Bearer tokens.
    pub tokens: Vec<TokenConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: None,
            grpc_listen: None,
            max_body_bytes: 1 << 20,
            insecure: false,
            tokens: Vec::new(),
        }
    }
}

/// `[[serve.tokens]]`: a bearer token.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs instead of the secret.
    #[serde(deserialize_with = "de_stringish")]
    pub name: String,
    /// The token itself.
    pub secret: Secret,
    /// What it may do.
    pub scope: Scope,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read only.
    Read,
    /// Read and write.
    Write,
}

impl Scope {
    /// Whether a token of this scope may do what needs `needed` (write
    /// implies read).
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Write || needed == Scope::Read
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or
    /// `tracing` filter directives (`warn,switchyard_core=debug`). Default
    /// `info`.
    #[serde(deserialize_with = "de_stringish")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// `level` as `tracing` filter directives (`EnvFilter` syntax): the one
    /// place a host turns `log.level` into its subscriber's filter.
    /// [`Config::load`] has already refused a level that is not one.
    pub fn filter(&self) -> String {
        self.level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The filter a host applies: the first of the environment variables
    /// `overrides` (e.g. `RUST_LOG`, `SWITCHYARD_LOG`) that is set and not
    /// empty, else [`Self::filter`].
    pub fn effective_filter(&self, overrides: &[&str]) -> String {
        overrides
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
            .unwrap_or_else(|| self.filter())
    }
}

// ---------------------------------------------------------------------------
// Durations and addresses
// ---------------------------------------------------------------------------

/// Parses `"500ms"`, `"30s"`, `"2m"`, `"1h"` (or a bare number of
/// seconds, also fractional: `"1.5"`).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let bad = || {
        format!("`{text}` is not a duration (expected a number with a unit ms, s, m or h, e.g. \"500ms\", \"30s\", \"2m\", or a number of seconds)")
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(bad());
    }
    let n: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    secs_to_duration(secs).map_err(|_| bad())
}

fn secs_to_duration(secs: f64) -> std::result::Result<Duration, String> {
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{secs} is not a non-negative number of seconds"));
    }
    if secs > crate::validate::MAX_DURATION.as_secs_f64() {
        return Err(format!("{secs} s is longer than 100 years"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `"30s"`, `"500ms"`: whole seconds when exact, else milliseconds.
pub fn format_duration(d: Duration) -> String {
    if Duration::from_secs(d.as_secs()) == d {
        format!("{}s", d.as_secs())
    } else if Duration::from_millis(d.as_millis() as u64) == d {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration (\"500ms\", \"30s\", \"2m\", or a number of seconds)")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Duration, E> {
        secs_to_duration(v as f64).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Duration, E> {
        secs_to_duration(v as f64).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Duration, E> {
        secs_to_duration(v).map_err(E::custom)
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    Ok(Some(d.deserialize_any(DurationVisitor)?))
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

struct AddrVisitor;

impl Visitor<'_> for AddrVisitor {
    type Value = SocketAddr;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address IP:PORT (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<SocketAddr, E> {
        crate::bridge::listen_address("the value", v).map_err(E::custom)
    }
}

fn de_opt_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<SocketAddr>, D::Error> {
    Ok(Some(d.deserialize_any(AddrVisitor)?))
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// `SWITCHYARD_STORE`, as a provider of `store.url` whose errors name it.
struct StoreShorthand(Option<String>);

impl Provider for StoreShorthand {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {STORE_ENV}"))
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        if let Some(url) = &self.0 {
            let mut store = Dict::new();
            store.insert("url".into(), url.clone().into());
            dict.insert("store".into(), store.into());
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

fn store_shorthand() -> StoreShorthand {
    StoreShorthand(
        std::env::var(STORE_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty()),
    )
}

/// Where the value at `path` (e.g. `["host", "concurrency"]`) came from,
/// as an error message says it: `in file `P``, `from environment variable
/// `SWITCHYARD_HOST__CONCURRENCY``.
fn origin(md: Option<&Metadata>, path: &[String]) -> String {
    match md {
        Some(md) => match &md.source {
            Some(Source::File(p)) => format!("in file `{}`", p.display()),
            _ if md.name.contains(STORE_ENV) => format!("from environment variable `{STORE_ENV}`"),
            _ if md.name.contains("environment") => {
                let var: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("from environment variable `{ENV_PREFIX}{}`", var.join("__"))
            }
            _ => format!("in {}", md.name),
        },
        None => "in the configuration".into(),
    }
}

/// figment's errors (one per bad key), each naming the key and its source.
fn describe(err: figment::Error) -> Error {
    let mut lines = Vec::new();
    for e in err {
        let mut path = e.path.clone();
        let what = match &e.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!(
                    "unknown key (expected {})",
                    if expected.is_empty() {
                        "none".to_string()
                    } else {
                        expected.join(", ")
                    }
                )
            }
            other => other.to_string(),
        };
        let key = if path.is_empty() {
            "(top level)".to_string()
        } else {
            path.join(".")
        };
        lines.push(format!(
            "configuration key `{key}` {}: {what}",
            origin(e.metadata.as_ref(), &path)
        ));
    }
    Error::Config(redact_url(&lines.join("\n")))
}

impl Config {
    /// The configuration: defaults, then the file at `path` (else the one
    /// named by `SWITCHYARD_CONFIG`, else none), then `SWITCHYARD_STORE`,
    /// then `SWITCHYARD_<SECTION>__<KEY>` variables; checked
    /// (`Config::validate`). A named file that does not exist, a file
    /// that is not TOML, unknown keys and wrong types are
    /// [`Error::Config`], naming the key and the file or variable.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path: Option<PathBuf> = match path {
            Some(p) => Some(p.to_path_buf()),
            None => std::env::var_os(CONFIG_ENV)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        };
        let mut figment = Figment::new();
        if let Some(p) = &path {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::Config(format!("configuration file `{}`: {e}", p.display())))?;
            // Checked here first so a syntax error is reported without
            // quoting the file's text (which may hold a secret).
            if let Err(e) = toml::from_str::<toml::Table>(&text) {
                let at = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(", line {line}")
                    })
                    .unwrap_or_default();
                return Err(Error::Config(format!(
                    "configuration file `{}`{at}: not valid TOML: {}",
                    p.display(),
                    redact_url(e.message())
                )));
            }
            let file = Figment::from(Toml::file_exact(p));
            // Each layer alone first, so an error names the layer it is in.
            file.extract::<Config>().map_err(describe)?;
            figment = figment.merge(Toml::file_exact(p));
        }
        let env = Figment::from(store_shorthand()).merge(env_provider());
        env.extract::<Config>().map_err(describe)?;
        let figment = figment.merge(store_shorthand()).merge(env_provider());
        let config: Config = figment.extract().map_err(describe)?;
        config.validate().map_err(|CheckError { key, message }| {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            // Array items (`serve.tokens.1.name`) have no metadata of their
            // own: the nearest enclosing value's is used.
            let md = (1..=path.len())
                .rev()
                .find_map(|n| figment.find_metadata(&path[..n].join(".")));
            let from = match md {
                Some(md) => origin(Some(md), &path),
                None => "(default)".into(),
            };
            Error::Config(redact_url(&format!(
                "configuration key `{key}` {from}: {message}"
            )))
        })?;
        Ok(config)
    }

    /// Checks what the types alone do not: counts of at least 1, a lease of
    /// at least 50 ms and a heartbeat shorter than it, a non-empty store
    /// URL and log level, unique non-empty token names and secrets, and no
    /// non-loopback `serve` address without tokens unless `insecure`.
    fn validate(&self) -> std::result::Result<(), CheckError> {
        let bad = |key: &str, message: String| {
            Err(CheckError {
                key: key.into(),
                message,
            })
        };
        if self.store.url.trim().is_empty() {
            return bad("store.url", "must not be empty".into());
        }
        if let Some(p) = self.store.poll_interval {
            if p < Duration::from_millis(1) || p > Duration::from_secs(3600) {
                return bad(
                    "store.poll_interval",
                    format!("must be between 1ms and 1h, got {}", format_duration(p)),
                );
            }
        }
        if let Some(n) = &self.host.name {
            if n.trim().is_empty() {
                return bad(
                    "host.name",
                    "must not be empty (leave it out for none)".into(),
                );
            }
        }
        if self.host.concurrency == 0 {
            return bad("host.concurrency", "must be at least 1".into());
        }
        if self.host.lease < Duration::from_millis(50) {
            return bad(
                "host.lease",
                format!(
                    "must be at least 50ms, got {}",
                    format_duration(self.host.lease)
                ),
            );
        }
        if let Some(h) = self.host.heartbeat {
            if h < Duration::from_millis(10) || h >= self.host.lease {
                return bad(
                    "host.heartbeat",
                    format!(
                        "must be at least 10ms and shorter than host.lease ({}), got {}",
                        format_duration(self.host.lease),
                        format_duration(h)
                    ),
                );
            }
        }
        if self.serve.max_body_bytes == 0 {
            return bad("serve.max_body_bytes", "must be at least 1".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.serve.tokens.iter().enumerate() {
            if t.name.trim().is_empty() {
                return bad(
                    &format!("serve.tokens.{i}.name"),
                    "must not be empty".into(),
                );
            }
            if !names.insert(t.name.as_str()) {
                return bad(
                    &format!("serve.tokens.{i}.name"),
                    format!("token name `{}` is used twice", t.name),
                );
            }
            if t.secret.expose().trim().is_empty() {
                return bad(
                    &format!("serve.tokens.{i}.secret"),
                    "must not be empty".into(),
                );
            }
        }
        if !self.serve.insecure && self.serve.tokens.is_empty() {
            for (key, addr) in [
                ("serve.listen", self.serve.listen),
                ("serve.grpc_listen", self.serve.grpc_listen),
            ] {
                if let Some(a) = addr {
                    if !a.ip().is_loopback() {
                        return bad(
                            key,
                            format!("{a} is not a loopback address and no serve.tokens are configured: add a token or set serve.insecure = true"),
                        );
                    }
                }
            }
        }
        let level = self.log.level.trim();
        if level.is_empty() || !valid_log_filter(level) {
            return bad(
                "log.level",
                format!("`{level}` is not a log level (trace, debug, info, warn, error, off) or a filter like `warn,switchyard_core=debug`"),
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, every secret shown as `***`.
    pub fn to_toml_redacted(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The effective configuration as JSON, every secret shown as `***`.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

struct CheckError {
    key: String,
    message: String,
}

/// `level` or comma-separated `target=level` / `level` directives.
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    filter.split(',').all(|d| {
        let d = d.trim();
        match d.rsplit_once('=') {
            Some((target, level)) => {
                !target.trim().is_empty()
                    && target
                        .trim()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
                    && is_level(level)
            }
            None => is_level(d),
        }
    })
}

#[cfg(test)]
mod tests;
