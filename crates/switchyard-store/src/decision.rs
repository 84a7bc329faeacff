//! The checks every store makes on a decision before touching its data:
//! step names and handlers present, names unique within the decision, no
//! step depending on itself, no cycle among the new steps, and `final_step`
//! naming one of them. What involves existing rows (a name already used in
//! the task, a dependency on an unknown step) each store checks itself.

use std::collections::HashMap;

use switchyard_core::{Error, NewStep, Result};

/// Validates the shape of a decision; the error names the offending field.
pub fn check_shape(steps: &[NewStep], final_step: Option<&str>) -> Result<()> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        if s.name.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "steps[{i}].name: must not be empty"
            )));
        }
        if s.handler.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "steps[{i}].handler: must not be empty (step `{}`)",
                s.name
            )));
        }
        if index.insert(s.name.as_str(), i).is_some() {
            return Err(Error::InvalidInput(format!(
                "steps[{i}].name: duplicate step name `{}`",
                s.name
            )));
        }
    }
    if let Some(f) = final_step {
        if !index.contains_key(f) {
            return Err(Error::InvalidInput(format!(
                "final_step: `{f}` is not one of the steps this decision creates"
            )));
        }
    }
    // Kahn's algorithm over the edges between new steps: a cycle would leave
    // its steps blocked forever.
    let mut indegree = vec![0usize; steps.len()];
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        let mut seen = Vec::new();
        for d in &s.depends_on {
            if d == &s.name {
                return Err(Error::InvalidInput(format!(
                    "steps[{i}].depends_on: `{d}` depends on itself"
                )));
            }
            if let Some(&j) = index.get(d.as_str()) {
                if !seen.contains(&j) {
                    seen.push(j);
                    indegree[i] += 1;
                    dependants[j].push(i);
                }
            }
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| indegree[i] == 0).collect();
    let mut done = 0;
    while let Some(j) = ready.pop() {
        done += 1;
        for &i in &dependants[j] {
            indegree[i] -= 1;
            if indegree[i] == 0 {
                ready.push(i);
            }
        }
    }
    if done < steps.len() {
        let cyclic: Vec<&str> = steps
            .iter()
            .enumerate()
            .filter(|(i, _)| indegree[*i] > 0)
            .map(|(_, s)| s.name.as_str())
            .collect();
        return Err(Error::InvalidInput(format!(
            "steps.depends_on: dependency cycle among {}",
            cyclic.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(name: &str, deps: &[&str]) -> NewStep {
        NewStep {
            name: name.into(),
            handler: "h".into(),
            input: json!(null),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            routes: Default::default(),
        }
    }

    #[test]
    fn rejects_each_bad_shape_naming_the_field() {
        let bad = |steps: Vec<NewStep>, f: Option<&str>, needle: &str| {
            let e = check_shape(&steps, f).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        };
        bad(vec![step("", &[])], None, "steps[0].name");
        bad(
            vec![step("a", &[]), step("a", &[])],
            None,
            "duplicate step name `a`",
        );
        bad(vec![step("a", &["a"])], None, "depends on itself");
        bad(
            vec![step("a", &["b"]), step("b", &["a"])],
            None,
            "cycle among a, b",
        );
        bad(vec![step("a", &[])], Some("z"), "final_step");
        let mut h = step("a", &[]);
        h.handler = " ".into();
        bad(vec![h], None, "steps[0].handler");
    }

    #[test]
    fn accepts_a_dag_with_outside_dependencies() {
        let steps = vec![
            step("a", &["root"]),
            step("b", &["a", "a"]),
            step("c", &["a", "b"]),
        ];
        check_shape(&steps, Some("c")).unwrap();
    }
}
