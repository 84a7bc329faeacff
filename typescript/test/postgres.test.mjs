// The Node worker and client on the PostgreSQL store. The server is a
// throwaway one started by `switchyard dev-postgres` (initdb in a temporary
// directory, 127.0.0.1 on a free port), stopped when these tests are done.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { Worker, Client, InvalidInput } from "switchyard";

const cli = process.env.SWITCHYARD_CLI;
let server;
let url;

before(async () => {
  if (!cli) return;
  server = spawn(cli, ["dev-postgres"], { stdio: ["pipe", "pipe", "inherit"] });
  const exited = new Promise((_, reject) =>
    server.once("exit", (code) => reject(new Error(`dev-postgres exited with ${code}`))));
  const lines = createInterface({ input: server.stdout });
  const first = new Promise((resolve) => lines.once("line", resolve));
  url = (await Promise.race([first, exited])).trim();
  assert.match(url, /^postgres:\/\//);
});

after(async () => {
  if (!server) return;
  const stopped = new Promise((resolve) => server.once("exit", resolve));
  server.stdin.end(); // the server stops and removes its directory
  await stopped;
});

const skip = !cli && "SWITCHYARD_CLI not set";

test("Promise handlers, events and replay on PostgreSQL", { skip }, async (t) => {
  const worker = new Worker({ store: url, concurrency: 16 });
  const seen = [];
  worker.step("pg.double", async (input) => {
    seen.push(input.n);
    return { n: input.n * 2 };
  });
  worker.step("pg.approve", async (input, ctx) => {
    const first = await ctx.checkpoint("first", () => input);
    const event = await ctx.awaitEvent(`pg.approved:${input}`);
    return { first, event };
  });
  await worker.start();
  t.after(() => worker.close());
  const client = new Client({ store: url });
  const ids = await client.spawnMany(Array.from({ length: 200 }, (_, n) => ({ handler: "pg.double", input: { n } })));
  const results = await Promise.all(ids.map((id) => client.result(id, { timeout: 30 })));
  assert.deepEqual(results.map((r) => r.n), Array.from({ length: 200 }, (_, n) => 2 * n));
  assert.deepEqual([...seen].sort((a, b) => a - b), Array.from({ length: 200 }, (_, n) => n), "each ran once");

  const waiting = await client.spawn("pg.approve", "7");
  assert.equal(await client.emit("pg.approved:7", { ok: true }), true);
  assert.deepEqual(await client.result(waiting, { timeout: 30 }), { first: "7", event: { ok: true } });
  assert.equal((await client.get(waiting)).state, "completed");
});

test("a rejected Promise fails its step on PostgreSQL; bad input is refused", { skip }, async (t) => {
  const worker = new Worker({ store: url });
  worker.step("pg.explode", async () => {
    throw new RangeError("kaboom on postgres");
  }, { retry: 1 });
  await worker.start();
  t.after(() => worker.close());
  const client = new Client({ store: url });
  const bad = await client.spawn("pg.explode", null);
  await assert.rejects(client.result(bad, { timeout: 30 }), /kaboom on postgres/);
  await assert.rejects(client.spawn("", {}), InvalidInput);
});
