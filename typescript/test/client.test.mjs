import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, ConfigError, Worker, InvalidInput, NotFound, WaitTimeoutError, Conflict, StoreError, SwitchyardError } from "switchyard";
import { setup, tempStore, deferred } from "./helpers.mjs";

test("spawn with an idempotency key returns the first task", async (t) => {
  const { client } = await setup(t, (w) => w.step("echo", async (i) => i));
  const a = await client.spawn("echo", { n: 1 }, { idempotencyKey: "k-1" });
  const b = await client.spawn("echo", { n: 2 }, { idempotencyKey: "k-1" });
  assert.equal(a, b);
  assert.deepEqual(await client.result(a, { timeout: 10 }), { n: 1 });
});

test("spawnMany, list, get and inspect", async (t) => {
  const { client } = await setup(t, (w) => w.step("echo", async (i) => i));
  const ids = await client.spawnMany([
    { handler: "echo", input: 1 },
    { handler: "echo", input: 2, priority: 3 },
  ]);
  assert.equal(ids.length, 2);
  assert.deepEqual(await Promise.all(ids.map((id) => client.result(id, { timeout: 10 }))), [1, 2]);
  const listed = await client.list({ state: "completed", handler: "echo" });
  assert.deepEqual(listed.map((r) => r.id).sort(), [...ids].sort());
  for (const [name, payload] of [["order.1", 1], ["order.2", 2], ["other", 3]]) await client.emit(name, payload);
  assert.deepEqual((await client.events(100, { name: "order." })).map((e) => e.name).sort(), ["order.1", "order.2"]);
  assert.deepEqual((await client.events(1, { name: "order." })).map((e) => e.name), ["order.2"], "newest first");
  assert.deepEqual(await client.events(100, { name: "nothing.like.it" }), []);
  const rec = await client.get(ids[1]);
  assert.equal(rec.priority, 3);
  assert.equal(rec.state, "completed");
  const d = await client.inspect(ids[0]);
  assert.equal(d.task.id, ids[0]);
  assert.equal(d.steps.length, 1);
  assert.equal(d.steps[0].handler, "echo");
  assert.ok("taskId" in d.steps[0], "record keys are camelCase");
  const counts = await client.countSteps();
  assert.equal(counts.completed, 2);
  const workers = await client.workers();
  assert.ok(workers.length >= 1);
  assert.deepEqual(
    workers.map((h) => h.language),
    workers.map(() => "node"),
    "every host here is this Node process",
  );
  assert.ok(workers.every((h) => Number.isInteger(h.slots) && h.slots >= 1), JSON.stringify(workers));
});

test("result times out, cancel and retry", async (t) => {
  const gate = deferred();
  let runs = 0;
  const { client } = await setup(t, (w) =>
    w.step("gated", async (_i, ctx) => {
      runs++;
      if (runs === 1) {
        await new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)));
      }
      await gate.promise;
      return runs;
    }),
  );
  const id = await client.spawn("gated", {});
  await assert.rejects(client.result(id, { timeout: 0.05 }), WaitTimeoutError);
  assert.equal(await client.cancel(id), true);
  assert.equal((await client.wait(id, { timeout: 10 })).state, "cancelled");
  assert.equal(await client.cancel(id), false, "already finished");
  gate.resolve();
  await client.retry(id);
  assert.equal(await client.result(id, { timeout: 10 }), 2);
  await assert.rejects(client.retry(id), Conflict);
});

test("bad input is rejected with clear errors", async (t) => {
  const { url } = tempStore(t);
  const client = new Client({ store: url });
  await assert.rejects(client.get("not-a-uuid"), (e) => e instanceof SwitchyardError && /not-a-uuid/.test(e.message));
  await assert.rejects(client.get("01a208f0-b0eb-7155-a3ef-f4e5b5bdb865"), NotFound);
  await assert.rejects(client.spawn("", {}), (e) => e instanceof InvalidInput && /handler/.test(e.message));
  await assert.rejects(client.spawn("x", { n: 1n }), (e) => e instanceof InvalidInput && /not JSON-serialisable/.test(e.message));
  await assert.rejects(client.spawnMany("nope"), /array/);
  await assert.rejects(client.spawnMany([{ handler: "a" }, { handler: "b", input: { x: 1n } }]), /task #1 input is not JSON-serialisable/);
  await assert.rejects(client.spawnMany([{ handler: "a" }, { input: 1 }]), /task #1: handler must be a non-empty string/);
  await assert.rejects(client.spawn("a", null, { priority: "high" }), /spawn.*priority|invalid type/i);
  await assert.rejects(client.list({ state: "sleepy" }), /sleepy/);
  await assert.rejects(client.result("01a208f0-b0eb-7155-a3ef-f4e5b5bdb865", { timeout: -1 }), /timeout must be a non-negative/);
  // A store URL that cannot work fails at construction, naming the problem.
  for (const [store, says] of [
    ["sqlite:/nonexistent-dir/x/y.db", /directory `\/nonexistent-dir\/x` does not exist/],
    ["mysql://u:s3cr3t@h/db", /unrecognised store URL `mysql:\/\/u:\*\*\*@h\/db`/],
    ["sqlite:x.db?synchronous=sometimes", /synchronous/],
  ]) {
    for (const make of [() => new Client({ store }), () => new Worker({ store })]) {
      assert.throws(make, (e) => e instanceof ConfigError && e instanceof SwitchyardError && says.test(e.message) && !e.message.includes("s3cr3t"));
    }
  }
  assert.ok(StoreError.prototype instanceof SwitchyardError);
});

test("payload limits are enforced", async (t) => {
  const { url } = tempStore(t);
  const client = new Client({ store: url, maxPayloadBytes: 64 });
  await assert.rejects(client.spawn("x", { big: "y".repeat(200) }), (e) => e instanceof InvalidInput && /payload|large|bytes/i.test(e.message));
});

test("awaitEvent waits from outside any task for a response event", async (t) => {
  const { client } = await setup(t, (w) => w.step("answer", async (i) => ({ answer: i.q })));
  const waiting = client.awaitEvent("reply.ts", { timeout: 20 });
  await new Promise((r) => setTimeout(r, 50));
  const id = await client.spawn("answer", { q: 7 }, { responseEvent: "reply.ts" });
  const reply = await waiting;
  assert.equal(reply.task_id, id);
  assert.equal(reply.state, "completed");
  assert.deepEqual(reply.result, { answer: 7 });
  assert.equal(reply.error, null);
  await client.emit("plain.ts", { n: 1 });
  await client.emit("plain.ts", { n: 2 });
  assert.deepEqual(await client.awaitEvent("plain.ts", { timeout: 5 }), { n: 1 });
  await assert.rejects(client.awaitEvent("never.ts", { timeout: 0.2 }), (e) => e instanceof WaitTimeoutError && /`never\.ts`/.test(e.message));
  await assert.rejects(client.awaitEvent("", { timeout: 1 }), InvalidInput);
});

test("healthListen serves /healthz, /readyz and /metrics of a Node host", async (t) => {
  const { worker, client } = await setup(t, (w) => w.step("echo", async (i) => i), { healthListen: "127.0.0.1:0" });
  const addr = worker.healthAddr;
  assert.match(addr, /^127\.0\.0\.1:\d+$/);
  const id = await client.spawn("echo", { secret: "PAYLOAD-MARKER-ts" });
  await client.result(id, { timeout: 10 });
  assert.equal(await (await fetch(`http://${addr}/healthz`)).text(), "ok\n");
  assert.equal((await fetch(`http://${addr}/readyz`)).status, 200);
  let text = "";
  // The outcome is recorded by the completer just after the result is visible.
  for (let i = 0; i < 200 && !/switchyard_steps_completed_total\{handler="echo"\} 1/.test(text); i++) {
    text = await (await fetch(`http://${addr}/metrics`)).text();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.match(text, /switchyard_steps_completed_total\{handler="echo"\} 1/);
  assert.match(text, /switchyard_host_info\{host_id="[^"]+",lang="node"\} 1/);
  assert.ok(!text.includes("PAYLOAD-MARKER-ts"));
  assert.throws(() => new Worker({ store: "memory", healthListen: "localhost:80" }), /healthListen must be an address/);
});
