//! Replay keys: where the durable context stores what a run did.
//!
//! A key names (step, kind, name, occurrence) and is written so that no user
//! name can stand for another step, another name, another occurrence or an
//! internal entry:
//!
//! | kind | key |
//! | --- | --- |
//! | checkpoint `name` | `{step}/{name}` |
//! | `await_event(event)` | `$await:{step}/{event}` |
//! | its deadline | `$await:{step}/{event}:deadline` |
//! | sleep | `$sleep:{step}` |
//! | spawn | `$spawn:{step}` |
//! | delegation group | `$group:{step}` |
//!
//! and the n-th occurrence (n ≥ 2) in one run appends `#n` to the key of the
//! first (before `:deadline`). In `{step}`, `\` and `#` are escaped with a
//! backslash, and so is a leading `$`; in `{name}` and `{event}`, `\`, `/`,
//! `#` and `:` are. So the last unescaped `/` ends the step, an unescaped
//! `#` starts the occurrence, an unescaped `:` starts the deadline suffix,
//! and only internal keys start with `$` (user keys begin with the escaped
//! step). Names without those characters read as before (`charge/card`,
//! `$await:order/paid`), so most keys written by older versions are already
//! in this form; [`upgrade_legacy`] converts the others when a store migrates.

/// Appends `s` to `out`, escaping `\`, `#` and a leading `$`.
fn push_step(out: &mut String, s: &str) {
    for (i, c) in s.chars().enumerate() {
        if c == '\\' || c == '#' || (i == 0 && c == '$') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Appends `s` to `out`, escaping `\`, `/`, `#` and `:`.
fn push_name(out: &mut String, s: &str) {
    for c in s.chars() {
        if matches!(c, '\\' | '/' | '#' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The key of checkpoint `name` of `step` (first occurrence).
pub fn checkpoint(step: &str, name: &str) -> String {
    let mut k = String::with_capacity(step.len() + name.len() + 1);
    push_step(&mut k, step);
    k.push('/');
    push_name(&mut k, name);
    k
}

/// The key of `await_event(event)` in `step` (first occurrence).
pub fn await_event(step: &str, event: &str) -> String {
    let mut k = String::from("$await:");
    push_step(&mut k, step);
    k.push('/');
    push_name(&mut k, event);
    k
}

/// The key under which the deadline of the await at `await_key` is kept.
pub fn deadline(await_key: &str) -> String {
    format!("{await_key}:deadline")
}

/// An internal key of `kind` (`sleep`, `spawn`, `group`) for `step`.
pub fn internal(kind: &str, step: &str) -> String {
    let mut k = format!("${kind}:");
    push_step(&mut k, step);
    k
}

/// The key of occurrence `n` (1-based) of the operation whose first
/// occurrence has key `first`.
pub fn occurrence(first: &str, n: u32) -> String {
    if n <= 1 {
        first.to_string()
    } else {
        format!("{first}#{n}")
    }
}

/// True for keys the context keeps for itself (awaits, deadlines, sleeps,
/// spawns, groups) rather than the user's checkpoints.
pub fn is_internal(key: &str) -> bool {
    key.starts_with('$')
}

/// Splits a trailing `#n` (n ≥ 2, decimal) off a key written by an older
/// version, where the name before it was not escaped.
fn split_legacy_occurrence(s: &str) -> (&str, Option<&str>) {
    if let Some(i) = s.rfind('#') {
        let digits = &s[i + 1..];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return (&s[..i], Some(digits));
        }
    }
    (s, None)
}

/// Converts a key written by versions before structural keys (names were
/// not escaped) into today's form, given the name of the step that wrote it
/// (known from the checkpoint's `step_id`). Keys that are already in
/// today's form, or that do not belong to `step`, come back unchanged.
///
/// Old keys were ambiguous; where they were, the reading the old code would
/// itself have taken on replay wins: `x#2` is the second `x`, and
/// `e:deadline` after an await of `e` is that await's deadline.
pub fn upgrade_legacy(key: &str, step: &str) -> String {
    let with_occurrence = |mut k: String, n: Option<&str>| {
        if let Some(n) = n {
            k.push('#');
            k.push_str(n);
        }
        k
    };
    for kind in ["sleep", "spawn", "group"] {
        let prefix = format!("${kind}:{step}");
        if let Some(rest) = key.strip_prefix(&prefix) {
            let (empty, n) = split_legacy_occurrence(rest);
            if empty.is_empty() {
                return with_occurrence(internal(kind, step), n);
            }
        }
    }
    if let Some(rest) = key.strip_prefix(&format!("$await:{step}/")) {
        let (rest, is_deadline) = match rest.strip_suffix(":deadline") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (event, n) = split_legacy_occurrence(rest);
        let k = with_occurrence(await_event(step, event), n);
        return if is_deadline { deadline(&k) } else { k };
    }
    if let Some(rest) = key.strip_prefix(&format!("{step}/")) {
        if !key.starts_with('$') {
            let (name, n) = split_legacy_occurrence(rest);
            return with_occurrence(checkpoint(step, name), n);
        }
    }
    key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn plain_names_keep_their_old_keys() {
        assert_eq!(checkpoint("charge", "card"), "charge/card");
        assert_eq!(checkpoint("orders/charge", "card"), "orders/charge/card");
        assert_eq!(await_event("order", "paid"), "$await:order/paid");
        assert_eq!(
            deadline(&occurrence(&await_event("o", "paid"), 2)),
            "$await:o/paid#2:deadline"
        );
        assert_eq!(occurrence(&internal("sleep", "nap"), 3), "$sleep:nap#3");
    }

    #[test]
    fn names_cannot_collide() {
        // Each pair collided under the old scheme.
        let pairs = [
            (checkpoint("s", "a/b"), checkpoint("s/a", "b")),
            (checkpoint("s", "x#2"), occurrence(&checkpoint("s", "x"), 2)),
            (
                await_event("s", "e:deadline"),
                deadline(&await_event("s", "e")),
            ),
            (checkpoint("$await:s", "e"), await_event("s", "e")),
            (
                internal("sleep", "s#2"),
                occurrence(&internal("sleep", "s"), 2),
            ),
            (checkpoint("s\\", "x"), checkpoint("s", "\\x")),
            (checkpoint("s", "a\\"), checkpoint("s", "a\\\\")),
        ];
        for (a, b) in &pairs {
            assert_ne!(a, b);
        }
        // And a small exhaustive check over tricky alphabets.
        let parts = [
            "",
            "a",
            "/",
            "#",
            "#2",
            ":",
            ":deadline",
            "\\",
            "$",
            "a/b",
            "$await:a",
        ];
        let mut seen = HashSet::new();
        for step in &parts[1..] {
            for name in &parts[1..] {
                for n in 1..=3 {
                    for k in [
                        occurrence(&checkpoint(step, name), n),
                        occurrence(&await_event(step, name), n),
                        deadline(&occurrence(&await_event(step, name), n)),
                    ] {
                        assert!(seen.insert(k.clone()), "collision on {k}");
                    }
                }
            }
            for kind in ["sleep", "spawn", "group"] {
                for n in 1..=3 {
                    let k = occurrence(&internal(kind, step), n);
                    assert!(seen.insert(k.clone()), "collision on {k}");
                }
            }
        }
        // Only the context's own entries count as internal: no step name
        // makes a user checkpoint look like one.
        for step in &parts[1..] {
            for name in &parts[1..] {
                assert!(!is_internal(&checkpoint(step, name)), "{step} / {name}");
                assert!(is_internal(&await_event(step, name)), "{step} / {name}");
            }
            for kind in ["sleep", "spawn", "group"] {
                assert!(is_internal(&internal(kind, step)), "{kind} {step}");
            }
        }
    }

    #[test]
    fn legacy_keys_are_upgraded() {
        let cases = [
            ("charge/card", "charge", "charge/card"),
            ("charge/card#2", "charge", "charge/card#2"),
            ("s/a/b", "s", "s/a\\/b"),
            ("s/a/b", "s/a", "s/a/b"),
            ("fetch/page:1#3", "fetch", "fetch/page\\:1#3"),
            ("$await:o/paid:A-1", "o", "$await:o/paid\\:A-1"),
            (
                "$await:o/paid:A-1#2:deadline",
                "o",
                "$await:o/paid\\:A-1#2:deadline",
            ),
            ("$await:o/paid:deadline", "o", "$await:o/paid:deadline"),
            ("$sleep:n#2", "n", "$sleep:n#2"),
            ("$group:p", "p", "$group:p"),
            ("$spawn:a#b", "a#b", "$spawn:a\\#b"),
            ("other/x", "mine", "other/x"),
        ];
        for (old, step, new) in cases {
            assert_eq!(upgrade_legacy(old, step), new, "{old} of step {step}");
        }
    }
}
