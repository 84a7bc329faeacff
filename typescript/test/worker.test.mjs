import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Worker,
  Decision,
  step,
  PermanentError,
  RetryableError,
  InvalidInput,
  HttpError,
  NetworkError,
  TaskFailedError,
  SwitchyardError,
} from "switchyard";
import { setup, deferred, tempStore, until } from "./helpers.mjs";

test("async and sync handlers return values", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("async.greet", async (input, ctx) => ({ hello: input.name, attempt: ctx.attempt, handler: ctx.handler }));
    w.step("sync.double", (input) => input.n * 2);
    w.step("nothing", async () => undefined);
  });
  const a = await client.spawn("async.greet", { name: "Ada" });
  const b = await client.spawn("sync.double", { n: 21 });
  const c = await client.spawn("nothing");
  assert.deepEqual(await client.result(a, { timeout: 10 }), { hello: "Ada", attempt: 1, handler: "async.greet" });
  assert.equal(await client.result(b, { timeout: 10 }), 42);
  assert.equal(await client.result(c, { timeout: 10 }), null);
});

test("a rejected Promise is retried and its stack trace stored", async (t) => {
  let calls = 0;
  const { client } = await setup(t, (w) => {
    w.step(
      "flaky",
      async (input, ctx) => {
        calls++;
        if (ctx.attempt < 2) throw new TypeError("first attempt fails");
        return "second time lucky";
      },
      { retry: { maxAttempts: 3, initialBackoff: 0, maxBackoff: 0 } },
    );
  });
  const id = await client.spawn("flaky", {});
  assert.equal(await client.result(id, { timeout: 10 }), "second time lucky");
  assert.equal(calls, 2);
  const d = await client.inspect(id);
  const attempts = d.attempts ?? d.steps[0].attempts;
  const failed = JSON.stringify(d);
  assert.match(failed, /TypeError: first attempt fails/);
  assert.match(failed, /worker\.test\.mjs/, "the JS stack trace is stored on the step");
  assert.ok(attempts === undefined || Array.isArray(attempts));
});

test("PermanentError fails at once; other steps are unaffected", async (t) => {
  let calls = 0;
  const { client } = await setup(t, (w) => {
    w.step(
      "perm",
      async () => {
        calls++;
        throw new PermanentError("card declined");
      },
      { retry: 5 },
    );
    w.step("fine", async () => "ok");
  });
  const bad = await client.spawn("perm", {});
  const good = await client.spawn("fine", {});
  await assert.rejects(client.result(bad, { timeout: 10 }), (e) => e instanceof TaskFailedError && e.error.kind === "permanent" && /card declined/.test(e.message));
  assert.equal(await client.result(good, { timeout: 10 }), "ok");
  assert.equal(calls, 1);
  const rec = await client.get(bad);
  assert.equal(rec.state, "failed");
  assert.equal(rec.error.kind, "permanent");
  assert.match(rec.error.trace, /PermanentError: card declined/);
});

test("a thrown non-Error value fails the step with a clear message", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("throws.string", async () => {
      throw "just a string";
    }, { retry: 1 });
    w.step("rejects.number", () => Promise.reject(42), { retry: 1 });
  });
  const a = await client.spawn("throws.string");
  const b = await client.spawn("rejects.number");
  await assert.rejects(client.result(a, { timeout: 10 }), /non-Error value: "just a string"/);
  await assert.rejects(client.result(b, { timeout: 10 }), /non-Error value: 42/);
  const rec = await client.get(a);
  assert.match(rec.error.message, /handler `throws.string`/);
});

test("InvalidInput fails at once; RetryableError honours retryAfter", async (t) => {
  let retried = 0;
  const { client } = await setup(t, (w) => {
    w.step("invalid", async () => {
      throw new InvalidInput("no items");
    });
    w.step(
      "later",
      async (_i, ctx) => {
        retried++;
        if (ctx.attempt === 1) throw new RetryableError("busy", { retryAfter: 0.05 });
        return ctx.attempt;
      },
      { retry: 3 },
    );
  });
  const a = await client.spawn("invalid", {});
  const b = await client.spawn("later", {});
  await assert.rejects(client.result(a, { timeout: 10 }), /no items/);
  assert.equal((await client.get(a)).error.kind, "invalid_input");
  assert.equal(await client.result(b, { timeout: 10 }), 2);
  assert.equal(retried, 2);
});

test("a result that is not JSON fails only its step", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("bigint", async () => ({ n: 10n }));
    // Answered in the same turn of the event loop as the bad one, so both
    // go back to the core in one answer.
    w.step("fine", async (input) => ({ ok: input.i }));
    w.batch("mixed", async (items) => items.map((it) => (it.input.bad ? { n: 1n } : { ok: it.input.i })), {
      maxBatch: 4,
      linger: 0.2,
    });
  });
  const [bad, good] = await client.spawnMany([
    { handler: "bigint", input: {} },
    { handler: "fine", input: { i: 7 } },
  ]);
  await assert.rejects(client.result(bad, { timeout: 10 }), /no JSON form/);
  assert.equal((await client.get(bad)).error.kind, "permanent");
  assert.deepEqual(await client.result(good, { timeout: 10 }), { ok: 7 });
  const items = await client.spawnMany([
    { handler: "mixed", input: { i: 1 } },
    { handler: "mixed", input: { bad: true } },
    { handler: "mixed", input: { i: 3 } },
  ]);
  assert.deepEqual(await client.result(items[0], { timeout: 10 }), { ok: 1 });
  await assert.rejects(client.result(items[1], { timeout: 10 }), /no JSON form/);
  assert.deepEqual(await client.result(items[2], { timeout: 10 }), { ok: 3 });
});

test("a result with unpaired UTF-16 surrogates is stored with replacement characters", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("surrogates", async (input) => ({ lone: "a\ud800b", low: "\udfff", pair: "\ud83d\ude00", i: input.i }));
  });
  const ids = await client.spawnMany([0, 1, 2].map((i) => ({ handler: "surrogates", input: { i } })));
  for (const [i, id] of ids.entries()) {
    assert.deepEqual(await client.result(id, { timeout: 10 }), { lone: "a\ufffdb", low: "\ufffd", pair: "\ud83d\ude00", i });
  }
});

test("a ctx used after its run ended says so; its signal never fires", async (t) => {
  let kept;
  const { client } = await setup(t, (w) => {
    w.step("leak.ctx", async (_input, ctx) => {
      kept = ctx;
      return ctx.taskId;
    });
    w.step("leak.untouched", async (_input, ctx) => {
      kept = ctx;
      return null;
    });
  });
  const id = await client.spawn("leak.ctx", {});
  assert.equal(await client.result(id, { timeout: 10 }), id);
  // Made during the run: it keeps answering what it knew.
  assert.equal(kept.taskId, id);
  const id2 = await client.spawn("leak.untouched", {});
  await client.result(id2, { timeout: 10 });
  // Never used during the run: there is no run to ask any more.
  assert.throws(() => kept.taskId, (e) => e instanceof SwitchyardError && /run has ended/.test(e.message));
  assert.equal(kept.signal.aborted, false);
});

test("many Promise handlers run at once, up to the handler's concurrency", async (t) => {
  const gate = deferred();
  let running = 0;
  let peak = 0;
  const { client } = await setup(
    t,
    (w) => {
      w.step(
        "wait.gate",
        async (input) => {
          running++;
          peak = Math.max(peak, running);
          await gate.promise;
          running--;
          return input.i;
        },
        { concurrency: 8 },
      );
    },
    { concurrency: 32 },
  );
  const ids = await client.spawnMany(Array.from({ length: 20 }, (_, i) => ({ handler: "wait.gate", input: { i } })));
  await until(() => running === 8, 10_000, "8 handlers in flight");
  assert.equal(peak, 8, "never more than the handler's concurrency");
  gate.resolve();
  const results = await Promise.all(ids.map((id) => client.result(id, { timeout: 10 })));
  assert.deepEqual(results, Array.from({ length: 20 }, (_, i) => i));
  assert.equal(peak, 8);
});

test("batch handlers get many steps and answer each", async (t) => {
  const sizes = [];
  const { client } = await setup(t, (w) => {
    w.batch(
      "square",
      async (items) => {
        sizes.push(items.length);
        return items.map(({ input }) => (input.n === 3 ? new PermanentError("three is bad") : input.n * input.n));
      },
      { maxBatch: 16, linger: 0.05 },
    );
  });
  const ids = await client.spawnMany([1, 2, 3, 4, 5].map((n) => ({ handler: "square", input: { n } })));
  const out = await Promise.allSettled(ids.map((id) => client.result(id, { timeout: 10 })));
  assert.deepEqual(
    out.map((o) => (o.status === "fulfilled" ? o.value : "failed")),
    [1, 4, "failed", 16, 25],
  );
  assert.ok(sizes.some((s) => s > 1), `some calls got several steps: ${sizes}`);
  assert.equal(sizes.reduce((a, b) => a + b, 0), 5);
});

test("a batch handler returning the wrong number of results fails the batch clearly", async (t) => {
  const { client } = await setup(t, (w) => {
    w.batch("short", async () => [], { maxBatch: 4, retry: 1 });
  });
  const id = await client.spawn("short", {});
  await assert.rejects(client.result(id, { timeout: 10 }), /returned 0 results for 1 steps/);
});

test("decisions create steps with dependencies, complete, and fan out", async (t) => {
  const { client } = await setup(t, (w) => {
    w.decision("plan", async (input) => {
      if (input.done) return Decision.complete({ early: true });
      return Decision.create(
        [
          step("a", { handler: "add", input: { x: 1 } }),
          step("b", { handler: "add", input: { x: 2 } }),
          step("sum", { handler: "sum", dependsOn: ["a", "b"] }),
        ],
        "sum",
      );
    });
    w.step("add", async (input) => input.x + 10);
    w.step("sum", async (_i, ctx) => {
      const deps = await ctx.dependencyResults();
      return deps.a + deps.b;
    });
    w.decision("fan", async (input) => Decision.fanOut("chunk", input.total, 4, { tag: "t" }, "collect"));
    w.step("chunk", async (input) => input);
    w.step("collect", async (_i, ctx) => Object.keys(await ctx.dependencyResults()).length);
    w.decision("not.a.decision", async () => ({ steps: [] }));
  });
  assert.equal(await client.result(await client.spawn("plan", {}), { timeout: 10 }), 23);
  assert.deepEqual(await client.result(await client.spawn("plan", { done: true }), { timeout: 10 }), { early: true });
  assert.equal(await client.result(await client.spawn("fan", { total: 10 }), { timeout: 10 }), 3);
  await assert.rejects(
    client.result(await client.spawn("not.a.decision", {}), { timeout: 10 }),
    /returned object, not a Decision/,
  );
});

test("api handlers: 404 fails permanently, 429 and network errors are retried", async (t) => {
  const calls = { missing: 0, limited: 0, net: 0 };
  const { client } = await setup(t, (w) => {
    w.api("missing", async () => {
      calls.missing++;
      throw new HttpError(404, "no such user");
    }, { retry: 5 });
    w.api(
      "limited",
      async (_i, ctx) => {
        calls.limited++;
        if (ctx.attempt === 1) throw new HttpError(429, "slow down", { retryAfter: 0.01 });
        return "done";
      },
      { retry: 3, rateLimit: 100, burst: 5 },
    );
    w.api(
      "net",
      async (_i, ctx) => {
        calls.net++;
        if (ctx.attempt === 1) throw new NetworkError("connection reset");
        return "reached";
      },
      { retry: { maxAttempts: 3, initialBackoff: 0.01, maxBackoff: 0.01 } },
    );
  });
  const m = await client.spawn("missing", {});
  await assert.rejects(client.result(m, { timeout: 10 }), /404/);
  assert.equal(calls.missing, 1);
  assert.equal(await client.result(await client.spawn("limited", {}), { timeout: 10 }), "done");
  assert.equal(calls.limited, 2);
  assert.equal(await client.result(await client.spawn("net", {}), { timeout: 10 }), "reached");
  assert.equal(calls.net, 2);
});

test("bad registrations fail with errors naming what was wrong", async (t) => {
  const { url } = tempStore(t);
  const w = new Worker({ store: url });
  assert.throws(() => w.step("", async () => 1), (e) => e instanceof InvalidInput && /non-empty string/.test(e.message));
  assert.throws(() => w.step("x", "not a function"), /handler must be a function, got string/);
  assert.throws(() => w.step("x", async () => 1, { concurrency: 0 }), /concurrency must be at least 1/);
  assert.throws(() => w.step("x", async () => 1, { timeout: -1 }), /timeout must be a non-negative number/);
  assert.throws(() => w.api("x", async () => 1, { rateLimit: -3 }), /rateLimit must be a positive number/);
  w.step("dup", async () => 1);
  assert.throws(() => w.step("dup", async () => 1), /registered twice/);
  assert.throws(() => new Worker({ store: url, concurrency: 0 }), /concurrency must be a positive integer/);
  assert.throws(() => new Worker({ store: url, lease: "long" }), /lease must be a non-negative number/);
  await assert.rejects(new Worker({ store: url }).start(), /register at least one handler/);
  await assert.rejects(
    (async () => {
      const bad = new Worker({ store: "nosuchscheme:x" });
      bad.step("a", async () => 1);
      await bad.start();
    })(),
    (e) => e instanceof SwitchyardError && /nosuchscheme/.test(e.message),
  );
  await w.close();
  await assert.rejects(w.start(), /the worker was closed/);
  const twice = new Worker({ store: url });
  twice.step("a", async () => 1);
  await twice.start();
  await assert.rejects(twice.start(), /already started/);
  await twice.close();
  await twice.close();
});
