// The README's vocabulary table names each concept once per language: every
// name in its "TypeScript" column must exist in the installed package.
// `A#b`: `b` on `A.prototype` (methods and getters, inherited included);
// `A.b`: a static member of `A`; `A`: an export.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as pkg from "switchyard";

const README = process.env.SWITCHYARD_README;

/** The names in the TypeScript column of the README's Vocabulary table. */
function vocabulary() {
  assert.ok(README, "SWITCHYARD_README must name the repository's README.md (mk/node.mk sets it)");
  const text = readFileSync(README, "utf8");
  const at = text.indexOf("\n## Vocabulary");
  assert.notEqual(at, -1, "the README has a ## Vocabulary section");
  const section = text.slice(at + 1).split(/\n## /)[0];
  const rows = section.split("\n").filter((l) => l.startsWith("|"));
  const cells = (l) => l.split("|").slice(1, -1).map((c) => c.trim());
  const column = cells(rows[0]).indexOf("TypeScript");
  assert.notEqual(column, -1, `the table has a TypeScript column: ${rows[0]}`);
  const names = [];
  for (const row of rows.slice(2)) {
    const c = cells(row);
    for (const m of c[column].matchAll(/`([^`]+)`/g)) names.push({ concept: c[0], name: m[1] });
  }
  return names;
}

function exists(name) {
  const inst = name.match(/^(\w+)#(\w+)$/);
  const stat = name.match(/^(\w+)\.(\w+)$/);
  const owner = (inst ?? stat)?.[1] ?? name;
  if (!/^\w+$/.test(owner) || !Object.hasOwn(pkg, owner)) return false;
  const A = pkg[owner];
  // `in` finds getters without running them.
  if (inst) return typeof A === "function" && A.prototype != null && inst[2] in A.prototype;
  if (stat) return A != null && stat[2] in A;
  return true;
}

test("every TypeScript name in the README's vocabulary table exists in the package", () => {
  const names = vocabulary();
  assert.ok(names.length >= 25, `the table lists the TypeScript names (found ${names.length})`);
  const missing = names.filter((n) => !exists(n.name)).map((n) => `${n.name} (${n.concept})`);
  assert.deepEqual(missing, [], `missing from the package: ${missing.join(", ")}`);
});

test("the vocabulary check tells a missing name from a present one", () => {
  assert.ok(exists("Worker#stop") && exists("Context#stepName") && exists("Decision.complete") && exists("TaskCancelledError"));
  assert.ok(!exists("Worker#nope") && !exists("Decision.nope") && !exists("Nope") && !exists("Context#constructorX"));
});
