// What the core decides for a JS step (issue 21): the error vocabulary of
// client.result, durable control flow kept by the core, and spawn options
// checked by the core's one task parser.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Client,
  Decision,
  InvalidInput,
  PermanentError,
  TaskCancelledError,
  TaskFailedError,
  CancelledError,
  isSuspension,
} from "switchyard";
import { setup, tempStore, until } from "./helpers.mjs";

test("client.result rejects with TaskFailedError carrying the task id, kind, message, traceback and attempt", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("declines", async () => {
      throw new PermanentError("card declined");
    });
    w.step("flaky", async () => {
      throw new Error("still down");
    }, { retry: { maxAttempts: 2, initialBackoff: 0, maxBackoff: 0 } });
  });
  const id = await client.spawn("declines", {});
  const e = await client.result(id, { timeout: 10 }).then(() => assert.fail("expected a failure"), (e) => e);
  assert.ok(e instanceof TaskFailedError, String(e));
  assert.equal(e.taskId, id);
  assert.equal(e.kind, "permanent");
  assert.match(e.message, /card declined/);
  assert.match(e.traceback, /PermanentError: card declined/);
  assert.equal(e.attempt, 1);
  assert.equal(e.error.message, "card declined");

  const flaky = await client.spawn("flaky", {});
  const f = await client.result(flaky, { timeout: 10 }).then(() => assert.fail("expected a failure"), (e) => e);
  assert.ok(f instanceof TaskFailedError, String(f));
  assert.equal(f.taskId, flaky);
  assert.equal(f.kind, "retryable");
  assert.equal(f.attempt, 2, "the attempt the failure happened on");
  assert.match(f.traceback, /still down/);
});

test("client.result rejects with TaskCancelledError for a cancelled task", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("waits", async (_i, ctx) => ctx.awaitEvent("never"));
  });
  const id = await client.spawn("waits", {});
  await until(async () => (await client.inspect(id)).steps[0]?.state === "suspended", 10_000, "the step to suspend");
  assert.equal(await client.cancel(id), true);
  const e = await client.result(id, { timeout: 10 }).then(() => assert.fail("expected a failure"), (e) => e);
  assert.ok(e instanceof TaskCancelledError, String(e));
  assert.ok(!(e instanceof TaskFailedError) && !(e instanceof CancelledError), "a task's cancellation is its own class");
  assert.equal(e.taskId, id);
  assert.match(e.message, /cancel/);
});

test("a suspension thrown where no ctx call asked for it fails its step with the core's message", async (t) => {
  let stolen;
  const { client } = await setup(t, (w) => {
    w.step("waiter", async (_i, ctx) => {
      try {
        await ctx.awaitEvent("later");
      } catch (e) {
        if (isSuspension(e)) stolen ??= e;
        throw e;
      }
    });
    w.step("thief", async () => {
      throw stolen;
    });
  });
  await client.spawn("waiter", {});
  await until(() => stolen !== undefined, 10_000, "a suspension");
  const id = await client.spawn("thief", {});
  const e = await client.result(id, { timeout: 10 }).then(() => assert.fail("expected a failure"), (e) => e);
  assert.ok(e instanceof TaskFailedError, String(e));
  assert.equal(e.kind, "permanent");
  assert.match(e.message, /raised Suspend but no context call asked it to/);
});

test("a step suspends 50 times in a row and finishes within its first attempt", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("waits", async (_i, ctx) => {
      for (let i = 0; i < 50; i++) await ctx.awaitEvent(`go-${i}`);
      return 50;
    });
  });
  const id = await client.spawn("waits", {});
  for (let i = 0; i < 50; i++) {
    // Each event is emitted once run i+1 has suspended on it.
    await until(async () => {
      const s = (await client.inspect(id)).steps[0];
      assert.ok(!["completed", "failed", "cancelled"].includes(s.state), JSON.stringify(s));
      return s.state === "suspended" && s.run === i + 1;
    }, 10_000, `run ${i + 1} to suspend`);
    await client.emit(`go-${i}`, null);
  }
  assert.equal(await client.result(id, { timeout: 30 }), 50);
  const s = (await client.inspect(id)).steps[0];
  assert.deepEqual([s.attempt, s.run], [1, 51], "51 runs, all in the first attempt");
});

test("spawn refuses an unknown option or `parent`, naming it", async (t) => {
  const { url } = tempStore(t);
  const client = new Client({ store: url });
  await assert.rejects(client.spawn("h", {}, { prio: 1 }), (e) => e instanceof InvalidInput && /unknown key `prio`/.test(e.message));
  await assert.rejects(client.spawn("h", {}, { parent: "x" }), (e) => e instanceof InvalidInput && /`parent`/.test(e.message));
  await assert.rejects(
    client.spawnMany([{ handler: "h" }, { handler: "h", parent: { task: "x" } }]),
    (e) => e instanceof InvalidInput && /task #1/.test(e.message) && /`parent`/.test(e.message),
  );
  await assert.rejects(client.spawn("h", {}, { priority: 1.5 }), (e) => e instanceof InvalidInput && /priority/.test(e.message));
  // The options it knows still work.
  const id = await client.spawn("h", { a: 1 }, { priority: 3, idempotencyKey: "k", runAt: new Date(0), headers: { x: "y" } });
  const rec = await client.get(id);
  assert.equal(rec.priority, 3);
  assert.equal(await client.spawn("h", {}, { idempotencyKey: "k" }), id);
});

test("Decision.fanOut's plan and its checks are the core's", () => {
  const d = Decision.fanOut("part", 5, 2, { q: 1 }, "sum");
  assert.equal(d.steps.length, 4);
  assert.equal(d.finalStep, "sum");
  assert.throws(() => Decision.fanOut("part", -1, 2), (e) => e instanceof InvalidInput && /negative/.test(e.message));
  assert.throws(() => Decision.fanOut("part", 5, 0), (e) => e instanceof InvalidInput && /batch_size/.test(e.message));
  assert.throws(() => Decision.fanOut("part", 1e12, 1), (e) => e instanceof InvalidInput && /larger batches/.test(e.message));
});
