// Shared helpers for the node:test suite. Tests run against the package
// installed from its tarball (see mk/node.mk), with real SQLite files.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Worker, Client } from "switchyard";

/** A fresh SQLite store URL in a temp dir removed after the test. */
export function tempStore(t, name = "test.db") {
  const dir = mkdtempSync(join(tmpdir(), "switchyard-node-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return { url: `sqlite:${join(dir, name)}`, dir };
}

/** A started worker (stopped after the test) and a client on one store. */
export async function setup(t, register, options = {}) {
  const { url, dir } = tempStore(t);
  const worker = new Worker({ store: url, concurrency: 16, shutdownGrace: 2, ...options });
  register(worker);
  await worker.start();
  t.after(() => worker.stop());
  return { worker, client: new Client({ store: url }), store: url, dir };
}

/** Waits until `cond()` is truthy, checking on each turn of the event loop
 * and on timers, failing after `ms`. */
export async function until(cond, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A promise with its resolve function (a one-shot channel). */
export function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

/** The step of `task` named `name` from `client.inspect`. */
export async function stepOf(client, taskId, name) {
  const d = await client.inspect(taskId);
  return d.steps.find((s) => s.name === name);
}
