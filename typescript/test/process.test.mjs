import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Worker as ThreadWorker } from "node:worker_threads";
import * as esm from "switchyard";
import { Client, Worker } from "switchyard";
import { tempStore } from "./helpers.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

/** Starts `node args...`; resolves lines of stdout through `next(pattern)`. */
function node(t, args, options = {}) {
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], ...options });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  });
  let out = "";
  let err = "";
  const waiters = [];
  child.stdout.setEncoding("utf8");
  child.stderr.setEncoding("utf8");
  child.stdout.on("data", (d) => {
    out += d;
    for (const w of [...waiters]) w();
  });
  child.stderr.on("data", (d) => (err += d));
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  return {
    child,
    exited,
    out: () => out,
    err: () => err,
    next(re, ms = 20_000) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${re} in stdout: ${out}\nstderr: ${err}`)), ms);
        const check = () => {
          const m = out.match(re);
          if (m) {
            clearTimeout(timer);
            waiters.splice(waiters.indexOf(check), 1);
            resolve(m);
          }
        };
        waiters.push(check);
        check();
      });
    },
  };
}

async function exitedWithin(p, ms, what) {
  let timer;
  const r = await Promise.race([p.exited, new Promise((resolve) => (timer = setTimeout(() => resolve("hung"), ms)))]);
  clearTimeout(timer);
  assert.notEqual(r, "hung", `${what} did not exit on its own; stdout: ${p.out()} stderr: ${p.err()}`);
  return r;
}

test("the installed package is used, from ESM and from CommonJS, sharing one implementation", () => {
  const resolved = require.resolve("switchyard");
  assert.match(resolved, /node_modules[\\/]switchyard[\\/]dist[\\/]index\.js$/);
  assert.ok(!resolved.includes(`${join("typescript", "dist")}`));
  const cjs = require("switchyard");
  assert.equal(cjs.Worker, esm.Worker, "ESM re-exports the CommonJS classes");
  assert.equal(cjs.nativeVersion, esm.nativeVersion);
  for (const name of Object.keys(cjs)) assert.ok(name in esm, `ESM exports ${name}`);
  assert.equal(typeof esm.default.Client, "function");
});

test("after close() the process exits on its own (CommonJS user)", async (t) => {
  const { url } = tempStore(t);
  const p = node(t, [join(here, "fixtures", "exit_after_close.cjs"), url]);
  const r = await exitedWithin(p, 30_000, "the CommonJS script");
  assert.equal(r.code, 0, p.err());
  assert.match(p.out(), /hello cjs\nclosed\n/);
});

test("SIGTERM drains the in-flight step, then the process exits", async (t) => {
  const { url, dir } = tempStore(t);
  const p = node(t, [join(here, "fixtures", "slow_worker.mjs"), url]);
  await p.next(/ready \S+/);
  const client = new Client({ store: url });
  const release = join(dir, "release");
  const id = await client.spawn("slow", { release });
  await p.next(new RegExp(`started ${id}`));
  p.child.kill("SIGTERM");
  // The worker stops claiming but lets the running step finish.
  writeFileSync(release, "");
  const r = await exitedWithin(p, 30_000, "the worker");
  assert.deepEqual(r, { code: 0, signal: null }, p.err());
  assert.match(p.out(), /stopped/);
  assert.equal(await client.result(id, { timeout: 10 }), "finished during the drain");
});

test("SIGINT stops an idle worker gracefully", async (t) => {
  const { url } = tempStore(t);
  const p = node(t, [join(here, "fixtures", "slow_worker.mjs"), url]);
  await p.next(/ready \S+/);
  p.child.kill("SIGINT");
  const r = await exitedWithin(p, 30_000, "the worker");
  assert.deepEqual(r, { code: 0, signal: null }, p.err());
  assert.match(p.out(), /stopped/);
});

test("a worker runs inside worker_threads", async (t) => {
  const { url } = tempStore(t);
  const th = new ThreadWorker(join(here, "fixtures", "thread_worker.mjs"), { workerData: { store: url } });
  t.after(() => th.terminate());
  const messages = [];
  const next = () => new Promise((resolve, reject) => {
    th.once("message", (m) => { messages.push(m); resolve(m); });
    th.once("error", reject);
  });
  assert.equal(await next(), "ready");
  const client = new Client({ store: url });
  const id = await client.spawn("in.thread", { n: 21 });
  assert.deepEqual(await client.result(id, { timeout: 10 }), { doubled: 42, task: id });
  // Listen for the exit before asking: a thread that ends right after its
  // last message has both events emitted in one go (Node drains the
  // thread's messages, then emits "exit", with no await in between).
  const exited = new Promise((resolve) => th.once("exit", resolve));
  const closed = next();
  th.postMessage("stop");
  assert.equal(await closed, "closed");
  assert.equal(await exited, 0, "the thread ended on its own once its worker closed");
});

test("terminating a worker thread hands its in-flight step back", async (t) => {
  const { url } = tempStore(t);
  const th = new ThreadWorker(join(here, "fixtures", "thread_worker.mjs"), { workerData: { store: url } });
  const message = (want) =>
    new Promise((resolve, reject) => {
      const on = (m) => {
        if (m === want) {
          th.off("message", on);
          resolve();
        }
      };
      th.on("message", on);
      th.once("error", reject);
    });
  await message("ready");
  const client = new Client({ store: url });
  const id = await client.spawn("held", {});
  await message("holding");
  await th.terminate();
  // Another worker in this thread takes the step over once it is handed back
  // (not after a lease expiry: the lease is 30 s and the wait is 20 s).
  const worker = new Worker({ store: url });
  worker.step("held", async (_i, ctx) => ({ attempt: ctx.attempt, by: "main thread" }));
  await worker.start();
  t.after(() => worker.close());
  const res = await client.result(id, { timeout: 20 });
  assert.equal(res.by, "main thread");
});

/** The task's step after a host that held it went away: it must be ready
 * again with its attempt unchanged, then run to completion on another host,
 * with nothing recorded against it and the task not cancelled. */
async function takenOverWithoutCost(t, url, client, id) {
  const worker = new Worker({ store: url, handleSignals: false });
  worker.step("long", async (_i, ctx) => ({ attempt: ctx.attempt, run: ctx.run }));
  await worker.start();
  t.after(() => worker.close());
  // Well within the 30 s lease and the 120 s grace of the host that left.
  const res = await client.result(id, { timeout: 10 });
  assert.equal(res.attempt, 1, "handing the step back cost no attempt");
  assert.equal(res.run, 2, "the second run of the step");
  const rec = await client.get(id);
  assert.equal(rec.state, "completed");
  const d = await client.inspect(id);
  assert.equal(d.steps.length, 1);
  assert.equal(d.steps[0].error ?? null, null, `no error recorded: ${JSON.stringify(d.steps[0])}`);
}

test("a process exiting while its step runs hands the step back without costing an attempt", async (t) => {
  const { url } = tempStore(t);
  const client = new Client({ store: url });
  const id = await client.spawn("long", {});
  const p = node(t, [join(here, "fixtures", "exit_while_running.mjs"), url]);
  await p.next(new RegExp(`started ${id} attempt 1`));
  const r = await exitedWithin(p, 20_000, "the exiting worker");
  assert.deepEqual(r, { code: 0, signal: null }, p.err());
  await takenOverWithoutCost(t, url, client, id);
});

test("a terminated worker thread hands its running step back without costing an attempt", async (t) => {
  const { url } = tempStore(t);
  const client = new Client({ store: url });
  const id = await client.spawn("long", {});
  const th = new ThreadWorker(join(here, "fixtures", "exit_while_running.mjs"), { workerData: { store: url } });
  t.after(() => th.terminate());
  await new Promise((resolve, reject) => {
    th.on("message", (m) => m === `started ${id} attempt 1` && resolve());
    th.once("error", reject);
  });
  await th.terminate();
  await takenOverWithoutCost(t, url, client, id);
});

// A Python worker (the wheel built by `make python-wheel`) when available.
const python = process.env.SWITCHYARD_PYTHON;
const havePython = (() => {
  if (!python) return false;
  try {
    execFileSync(python, ["-c", "import switchyard"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

const PY_WORKER = `
import sys, switchyard
worker = switchyard.Worker(sys.argv[1], concurrency=4)

@worker.step("py.upper")
def upper(input, ctx):
    return {"upper": ctx.checkpoint("upper", lambda: input["s"].upper()), "by": "python"}

worker.run()
print("python worker stopped", flush=True)
`;

test("a Node worker and a Python worker share one SQLite store", { skip: !havePython && "no Python switchyard (SWITCHYARD_PYTHON)" }, async (t) => {
  const { url } = tempStore(t, "polyglot.db");
  const py = spawn(python, ["-c", PY_WORKER, url], { stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => py.exitCode === null && py.kill("SIGKILL"));
  let pyOut = "";
  let pyErr = "";
  py.stdout.on("data", (d) => (pyOut += d));
  py.stderr.on("data", (d) => (pyErr += d));
  const pyExited = new Promise((resolve) => py.on("exit", (code, signal) => resolve({ code, signal })));
  const worker = new Worker({ store: url });
  worker.step("node.shout", async (input, ctx) => {
    const fromPython = await ctx.delegate("py.upper", { s: input.s });
    return { ...fromPython, relayedBy: "node" };
  });
  worker.step("node.echo", async (input) => input);
  await worker.start();
  t.after(() => worker.close());
  const client = new Client({ store: url });
  const id = await client.spawn("node.shout", { s: "hello" });
  assert.deepEqual(await client.result(id, { timeout: 30 }), { upper: "HELLO", by: "python", relayedBy: "node" });
  // Python spawns work for the Node worker through the same store, too.
  // (asynchronously: this thread must stay free to run node.echo).
  const { stdout: fromPy } = await promisify(execFile)(python, ["-c", `
import sys, switchyard
c = switchyard.Client(sys.argv[1])
print(c.result(c.spawn("node.echo", {"n": 7}), timeout=30)["n"])
`, url], { encoding: "utf8" });
  assert.equal(fromPy.trim(), "7");
  py.kill("SIGTERM");
  assert.deepEqual(await pyExited, { code: 0, signal: null }, pyErr);
  assert.match(pyOut, /python worker stopped/);
});

const cli = process.env.SWITCHYARD_CLI;
const testhost = process.env.SWITCHYARD_TESTHOST;

test("a Node worker and a Rust host share one SQLite store", { skip: !testhost && "SWITCHYARD_TESTHOST not set" }, async (t) => {
  const { url, dir } = tempStore(t, "shared.db");
  const rust = spawn(testhost, ["--store", url, "--handlers", "noop", "--log", join(dir, "rust.log")], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  t.after(() => rust.kill("SIGKILL"));
  const rustExited = new Promise((resolve) => rust.on("exit", (code) => resolve(code)));
  await new Promise((resolve, reject) => {
    let out = "";
    rust.stdout.on("data", (d) => {
      out += d;
      if (/ready \S+/.test(out)) resolve();
    });
    rust.on("exit", (code) => reject(new Error(`testhost exited with ${code}`)));
  });
  const worker = new Worker({ store: url });
  worker.step("node.parent", async (input, ctx) => {
    const fromRust = await ctx.delegate("noop", { echo: input.x });
    return { fromRust, by: "node" };
  });
  await worker.start();
  t.after(() => worker.close());
  const client = new Client({ store: url });
  const id = await client.spawn("node.parent", { x: 5 });
  assert.deepEqual(await client.result(id, { timeout: 20 }), { fromRust: { echo: 5 }, by: "node" });
  const d = await client.inspect(id);
  assert.equal(d.children.length, 1);
  const hosts = await client.workers();
  assert.ok(hosts.length >= 2, "both hosts registered in the store");
  rust.kill("SIGTERM");
  assert.equal(await rustExited, 0);
});

test("the switchyard CLI spawns a Node task and shows its JS stack trace", { skip: !cli && "SWITCHYARD_CLI not set" }, async (t) => {
  const { url } = tempStore(t, "cli.db");
  const worker = new Worker({ store: url });
  worker.step("cli.fails", async () => {
    throw new RangeError("out of range in node");
  }, { retry: 1 });
  worker.step("cli.ok", async (input) => ({ got: input }));
  await worker.start();
  t.after(() => worker.close());
  const run = (...args) => execFileSync(cli, ["--store", url, ...args], { encoding: "utf8" });
  const ok = JSON.parse(run("--json", "spawn", "cli.ok", "--input", '{"a":1}'));
  const okId = ok.task_id ?? ok.id;
  const client = new Client({ store: url });
  assert.deepEqual(await client.result(okId, { timeout: 10 }), { got: { a: 1 } });
  const bad = JSON.parse(run("--json", "spawn", "cli.fails", "--input", "{}"));
  const badId = bad.task_id ?? bad.id;
  await assert.rejects(client.result(badId, { timeout: 10 }));
  const shown = run("tasks", "show", badId);
  assert.match(shown, /RangeError: out of range in node/);
  assert.match(shown, /process\.test\.mjs/, "the JS stack trace is stored and shown");
});
