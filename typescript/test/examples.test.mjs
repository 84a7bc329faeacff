// Runs each reference scenario in examples/typescript (compiled from .mts by
// `make test-node` against the installed package's index.d.ts) to the end.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { tempStore } from "./helpers.mjs";

const examples = join(dirname(fileURLToPath(import.meta.url)), "..", "examples");
const run = promisify(execFile);

const cases = [
  ["order_events.mjs", /result: .*"status":"delivered"/],
  ["delegation.mjs", /response event report.ready/],
  ["tour.mjs", /shipped: \{"label":"LABEL-bolt","total":10\}\nbackordered: \{"backordered":3,"supplier":"on its way"\}\naudit: \["LABEL-a","LABEL-b"\]\nscan: cancelled/],
  ["inventory_cancel.mjs", /order bolt x4: check ended `ok` on attempt 2: \{"shipped":4,"sku":"bolt"\}[^]*order nut x3: check ended `out_of_stock` on attempt 2: \{"backordered":2,"sku":"nut"\}[^]*done: scan stopped at bin \d+ of 10000; watch and its scan cancelled/],
];

for (const [script, expect] of cases) {
  test(`example ${script} runs to the end`, async (t) => {
    const path = join(examples, script);
    assert.ok(existsSync(path), `${path} was compiled`);
    const { url } = tempStore(t, "example.db");
    const { stdout } = await run(process.execPath, [path, "--store", url], { timeout: 60_000 });
    assert.match(stdout, expect);
  });
}

test("example demo_worker.mjs serves charge.payment and stops on SIGTERM", async (t) => {
  const { Client } = await import("switchyard");
  const { url } = tempStore(t, "demo.db");
  const { spawn } = await import("node:child_process");
  const child = spawn(process.execPath, [join(examples, "demo_worker.mjs"), "--store", url], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => child.exitCode === null && child.kill("SIGKILL"));
  let out = "";
  const seen = (re) =>
    new Promise((resolve) => {
      const check = () => re.test(out) && resolve();
      child.stdout.on("data", (d) => {
        out += d;
        check();
      });
      check();
    });
  await seen(/serving charge\.payment/);
  const client = new Client({ store: url });
  const id = await client.spawn("charge.payment", { order: "A-7", amount: 63, currency: "EUR" });
  assert.deepEqual(await client.result(id, { timeout: 20 }), { authorisation: "AUTH-A-7", amount: 63, charged_by: "node" });
  await seen(/\[node pid \d+\] charge\.payment  authorised 63 EUR/);
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  child.kill("SIGTERM");
  assert.deepEqual(await exited, { code: 0, signal: null });
  assert.match(out, /worker stopped/);
});

test("the package README shows the tour as it runs (examples/typescript/tour.mts, verbatim)", async () => {
  const { readFileSync } = await import("node:fs");
  const { createRequire } = await import("node:module");
  const pkg = dirname(createRequire(import.meta.url).resolve("switchyard/package.json"));
  const readme = readFileSync(join(pkg, "README.md"), "utf8");
  const tour = readFileSync(join(examples, "tour.mts"), "utf8");
  assert.ok(readme.includes("```ts\n" + tour + "```"), "README.md of the installed package holds tour.mts");
});
