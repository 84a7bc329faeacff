//! Ruby's side of the core's error vocabulary ([`ErrorClass`]). The
//! exception classes are defined in Ruby (`lib/switchyard/errors.rb`) so
//! users can subclass and construct them naturally; [`init`] resolves each
//! one once, when the extension loads, and every raise uses that.
//! Exceptions going the other way (a handler's) are classified against the
//! same classes, most specific first, and answered with the core's
//! [`Reply`] constructors.

use std::sync::OnceLock;

use magnus::{kwargs, prelude::*, value::Opaque, Error, ExceptionClass, RModule, Ruby, Value};
use switchyard_core::bridge::{self, ErrorClass, Raised, Reply};
use switchyard_core::{Context, Error as CoreError, StepError};

struct Classes {
    /// Every vocabulary class, subclasses before their superclasses.
    vocab: Vec<(ErrorClass, Opaque<ExceptionClass>)>,
    /// `Switchyard::Error`.
    base: Opaque<ExceptionClass>,
    http: Opaque<ExceptionClass>,
    network: Opaque<ExceptionClass>,
}

static CLASSES: OnceLock<Classes> = OnceLock::new();

/// Resolves the exception classes (defined by `lib/switchyard/errors.rb`,
/// which `require "switchyard"` loads before this extension).
pub fn init(ruby: &Ruby, m: RModule) -> Result<(), Error> {
    let get = |name: &str| -> Result<ExceptionClass, Error> {
        let c: ExceptionClass = m.const_get(name).map_err(|_| {
            Error::new(
                ruby.exception_load_error(),
                format!(
                    "Switchyard::{name} is not defined: load the gem with `require \"switchyard\"`, \
                     not its native extension alone"
                ),
            )
        })?;
        ruby.gc_register_mark_object(c);
        Ok(c)
    };
    let mut vocab = Vec::with_capacity(ErrorClass::ALL.len());
    for &c in ErrorClass::ALL {
        let class = get(c.name())?;
        let depth = class
            .funcall::<_, _, magnus::RArray>("ancestors", ())?
            .len();
        vocab.push((depth, c, Opaque::from(class)));
    }
    vocab.sort_by_key(|v| std::cmp::Reverse(v.0));
    let classes = Classes {
        vocab: vocab.into_iter().map(|(_, c, o)| (c, o)).collect(),
        base: get("Error")?.into(),
        http: get("HttpError")?.into(),
        network: get("NetworkError")?.into(),
    };
    let _ = CLASSES.set(classes);
    Ok(())
}

fn classes(ruby: &Ruby) -> Result<&'static Classes, Error> {
    CLASSES.get().ok_or_else(|| {
        Error::new(
            ruby.exception_runtime_error(),
            "switchyard: the exception classes are not loaded",
        )
    })
}

fn class(ruby: &Ruby, c: ErrorClass) -> Option<ExceptionClass> {
    let cs = CLASSES.get()?;
    let (_, o) = cs.vocab.iter().find(|(k, _)| *k == c)?;
    Some(ruby.get_inner(*o))
}

/// A `Switchyard::<class>` exception with `msg`.
pub fn error(ruby: &Ruby, c: ErrorClass, msg: String) -> Error {
    match class(ruby, c) {
        Some(k) => Error::new(k, msg),
        None => Error::new(ruby.exception_runtime_error(), msg),
    }
}

/// A `Switchyard::Error` with `msg` (failures of the glue itself).
pub fn base_error(ruby: &Ruby, msg: String) -> Error {
    match classes(ruby) {
        Ok(cs) => Error::new(ruby.get_inner(cs.base), msg),
        Err(_) => Error::new(ruby.exception_runtime_error(), msg),
    }
}

/// What the core says to raise, as a Ruby exception: `TaskFailed` with
/// `task_id`, `kind`, `error_message`, `traceback`, `attempt`; `TaskCancelled` with
/// `task_id`; `AwaitTimeout` with `event`.
pub fn raise(ruby: &Ruby, r: Raised) -> Error {
    let Some(k) = class(ruby, r.class) else {
        return Error::new(ruby.exception_runtime_error(), r.message);
    };
    let task = r.task.map(|t| t.to_string());
    let made = match (r.class, r.error, r.event) {
        (ErrorClass::TaskFailed, Some(e), _) => k.new_instance((
            r.message,
            kwargs!(ruby, "task_id" => task, "kind" => e.kind.as_str(),
                "error_message" => e.message, "traceback" => e.trace, "attempt" => e.attempt),
        )),
        (ErrorClass::TaskCancelled, ..) => {
            k.new_instance((r.message, kwargs!(ruby, "task_id" => task)))
        }
        (ErrorClass::AwaitTimeout, _, Some(event)) => {
            k.new_instance((r.message, kwargs!(ruby, "event" => event)))
        }
        _ => return Error::new(k, r.message),
    };
    match made {
        Ok(e) => e.into(),
        Err(e) => e,
    }
}

/// A core error as a Ruby exception.
pub fn core_err(ruby: &Ruby, e: CoreError) -> Error {
    raise(ruby, Raised::from(e))
}

/// A failed context call of `ctx` as a Ruby exception (durable control
/// flow is kept in `ctx`, see [`bridge::raise`]).
pub fn step_err(ruby: &Ruby, ctx: &Context, e: StepError) -> Error {
    raise(ruby, bridge::raise(ctx, e))
}

/// A Rust panic as a `Switchyard::Error` (instead of Ruby's `fatal`).
pub fn panic_error(ruby: &Ruby, p: Box<dyn std::any::Any + Send>) -> Error {
    let msg = if let Some(m) = p.downcast_ref::<&'static str>() {
        (*m).to_string()
    } else if let Some(m) = p.downcast_ref::<String>() {
        m.clone()
    } else {
        "unknown panic".to_string()
    };
    base_error(ruby, format!("switchyard: a Rust panic: {msg}"))
}

fn opt_f64(v: Result<Value, Error>) -> Result<Option<f64>, Error> {
    let v = v?;
    if v.is_nil() {
        Ok(None)
    } else {
        f64::try_convert(v).map(Some)
    }
}

/// The answer for exception `e` that ended a handler, with its `message`
/// and `trace` as the Ruby side rendered them (never raising). Subclasses
/// count as their Switchyard class; an exception of any other class is
/// retryable, its message prefixed with the class name.
pub fn reply_for(ruby: &Ruby, e: Value, message: String, trace: Option<String>) -> Reply {
    let Ok(cs) = classes(ruby) else {
        return Reply::error(ErrorClass::Retryable, message, trace, None);
    };
    // SAFETY: the name is copied before any other Ruby call.
    let name = || unsafe { e.classname() }.into_owned();
    let unexpected = |message: String, trace| {
        Reply::error(
            ErrorClass::Retryable,
            format!("{}: {message}", name()),
            trace,
            None,
        )
    };
    if e.is_kind_of(ruby.get_inner(cs.http)) {
        let http = || -> Result<Reply, Error> {
            let status: u16 = e.funcall("status", ())?;
            let after = opt_f64(e.funcall("retry_after", ()))?;
            let body: String = e.funcall("body", ())?;
            Ok(Reply::http(status, after, body))
        };
        return http().unwrap_or_else(|_| unexpected(message, trace));
    }
    if e.is_kind_of(ruby.get_inner(cs.network)) {
        return Reply::network(message);
    }
    let found = cs
        .vocab
        .iter()
        .find(|(_, k)| e.is_kind_of(ruby.get_inner(*k)))
        .map(|(c, _)| *c);
    match found {
        Some(ErrorClass::Retryable) => {
            let after = opt_f64(e.funcall("retry_after", ())).unwrap_or(None);
            Reply::error(ErrorClass::Retryable, message, trace, after)
        }
        Some(
            c @ (ErrorClass::Permanent | ErrorClass::InvalidInput | ErrorClass::PayloadTooLarge),
        ) => Reply::error(c, message, trace, None),
        Some(c) if c.is_control_flow() => Reply::error(c, message, trace, None),
        _ => unexpected(message, trace),
    }
}
