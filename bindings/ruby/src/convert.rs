//! Ruby objects <-> JSON values, with errors that name the offending class
//! and where it was found. Hashes come into Ruby with string keys; symbols
//! (as keys or values) go out as strings.

use magnus::{
    value::ReprValue, Error, Float, Integer, RArray, RHash, RString, Ruby, Symbol, Value,
};
use serde_json::{Map, Number, Value as Json};

/// Converts a Ruby object into JSON. `what` names the value in errors
/// (e.g. "result of handler `charge`").
pub fn to_json(ruby: &Ruby, v: Value, what: &str) -> Result<Json, Error> {
    convert(ruby, v, what, 0)
}

fn class_name(v: Value) -> String {
    // SAFETY: the name is copied before any other Ruby call.
    unsafe { v.classname() }.into_owned()
}

fn type_error(ruby: &Ruby, msg: String) -> Error {
    Error::new(ruby.exception_type_error(), msg)
}

fn string(ruby: &Ruby, s: RString, what: &str) -> Result<String, Error> {
    s.to_string().map_err(|_| {
        type_error(
            ruby,
            format!("{what}: string is not valid UTF-8 (JSON text must be UTF-8)"),
        )
    })
}

fn convert(ruby: &Ruby, v: Value, what: &str, depth: usize) -> Result<Json, Error> {
    if depth > 256 {
        return Err(Error::new(
            ruby.exception_arg_error(),
            format!("{what} is nested more than 256 levels deep"),
        ));
    }
    if v.is_nil() {
        return Ok(Json::Null);
    }
    if magnus::value::Qtrue::from_value(v).is_some() {
        return Ok(Json::Bool(true));
    }
    if magnus::value::Qfalse::from_value(v).is_some() {
        return Ok(Json::Bool(false));
    }
    if let Some(s) = RString::from_value(v) {
        return Ok(Json::String(string(ruby, s, what)?));
    }
    if let Some(i) = Integer::from_value(v) {
        if let Ok(n) = i.to_i64() {
            return Ok(Json::Number(n.into()));
        }
        if let Ok(n) = i.to_u64() {
            return Ok(Json::Number(n.into()));
        }
        return Err(Error::new(
            ruby.exception_range_error(),
            format!("{what}: integer {} does not fit in 64 bits", v.inspect()),
        ));
    }
    if let Some(f) = Float::from_value(v) {
        let x = f.to_f64();
        return Number::from_f64(x).map(Json::Number).ok_or_else(|| {
            Error::new(
                ruby.exception_range_error(),
                format!("{what}: float {x} is not valid JSON"),
            )
        });
    }
    if let Some(h) = RHash::from_value(v) {
        let mut m = Map::new();
        let mut err = None;
        h.foreach(|k: Value, x: Value| {
            let key = if let Some(s) = RString::from_value(k) {
                string(ruby, s, what)?
            } else if let Some(s) = Symbol::from_value(k) {
                s.name()?.into_owned()
            } else {
                err = Some(type_error(
                    ruby,
                    format!(
                        "{what}: hash keys must be strings or symbols, not {}",
                        class_name(k)
                    ),
                ));
                return Ok(magnus::r_hash::ForEach::Stop);
            };
            m.insert(key, convert(ruby, x, what, depth + 1)?);
            Ok(magnus::r_hash::ForEach::Continue)
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        return Ok(Json::Object(m));
    }
    if let Some(a) = RArray::from_value(v) {
        let mut out = Vec::with_capacity(a.len());
        for i in 0..a.len() {
            let x: Value = a.entry(i as isize)?;
            out.push(convert(ruby, x, what, depth + 1)?);
        }
        return Ok(Json::Array(out));
    }
    if let Some(s) = Symbol::from_value(v) {
        return Ok(Json::String(s.name()?.into_owned()));
    }
    Err(type_error(
        ruby,
        format!(
            "{what}: an object of class {} is not JSON-serialisable (use Hash, Array, String, Symbol, Integer, Float, true, false or nil)",
            class_name(v)
        ),
    ))
}

/// Converts JSON into Ruby objects (Hash with string keys, Array, String,
/// Integer, Float, true, false, nil).
pub fn to_ruby(ruby: &Ruby, v: &Json) -> Result<Value, Error> {
    Ok(match v {
        Json::Null => ruby.qnil().as_value(),
        Json::Bool(true) => ruby.qtrue().as_value(),
        Json::Bool(false) => ruby.qfalse().as_value(),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ruby.integer_from_i64(i).as_value()
            } else if let Some(u) = n.as_u64() {
                ruby.integer_from_u64(u).as_value()
            } else {
                ruby.float_from_f64(n.as_f64().unwrap_or(f64::NAN))
                    .as_value()
            }
        }
        Json::String(s) => ruby.str_new(s).as_value(),
        Json::Array(a) => {
            let out = ruby.ary_new_capa(a.len());
            for x in a {
                out.push(to_ruby(ruby, x)?)?;
            }
            out.as_value()
        }
        Json::Object(m) => {
            let h = ruby.hash_new();
            for (k, x) in m {
                h.aset(ruby.str_new(k), to_ruby(ruby, x)?)?;
            }
            h.as_value()
        }
    })
}

/// Serialises a Rust record (task, step, host...) into Ruby objects.
pub fn record_to_ruby<T: serde::Serialize>(ruby: &Ruby, r: &T) -> Result<Value, Error> {
    let v = serde_json::to_value(r)
        .map_err(|e| Error::new(ruby.exception_runtime_error(), e.to_string()))?;
    to_ruby(ruby, &v)
}
