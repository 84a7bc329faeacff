import { test } from "node:test";
import assert from "node:assert/strict";
import { AwaitTimeoutError, CancelledError, Decision, InvalidInput, TaskCancelledError, TaskFailedError, isSuspension, step } from "switchyard";
import { setup, until, stepOf, tempStore } from "./helpers.mjs";

test("checkpoint runs once; awaitEvent suspends and the replay resumes", async (t) => {
  let sideEffects = 0;
  let runs = 0;
  const { client } = await setup(t, (w) => {
    w.step("order", async (input, ctx) => {
      runs++;
      const reservation = await ctx.checkpoint("reserve", async () => {
        sideEffects++;
        return { id: `RES-${input.order}` };
      });
      const paid = await ctx.awaitEvent(`paid:${input.order}`);
      return { reservation, paid };
    });
  });
  const id = await client.spawn("order", { order: "A-1" });
  await until(async () => (await stepOf(client, id, "order"))?.state === "suspended", 10_000, "the step to suspend");
  assert.equal(await client.emit("paid:A-1", { amount: 63 }), true);
  assert.deepEqual(await client.result(id, { timeout: 10 }), { reservation: { id: "RES-A-1" }, paid: { amount: 63 } });
  assert.equal(sideEffects, 1, "the checkpoint did not run again on replay");
  assert.equal(runs, 2, "the handler ran again after the event");
  const d = await client.inspect(id);
  assert.ok(JSON.stringify(d.checkpoints).includes("RES-A-1"));
});

test("an event emitted before the wait is returned at once", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("waiter", async (input, ctx) => ctx.awaitEvent(input.event));
  });
  await client.emit("early:1", { early: true });
  assert.deepEqual(await client.result(await client.spawn("waiter", { event: "early:1" }), { timeout: 10 }), { early: true });
});

test("awaitEvent timeouts throw AwaitTimeoutError, also on replay", async (t) => {
  let seen = 0;
  const { client } = await setup(t, (w) => {
    w.step("patient", async (_i, ctx) => {
      try {
        await ctx.awaitEvent("never:1", { timeout: 0.05 });
        return "got it";
      } catch (e) {
        if (isSuspension(e)) throw e;
        assert.ok(e instanceof AwaitTimeoutError);
        seen++;
        return `timed out on ${e.event}`;
      }
    });
    w.step("impatient", async (_i, ctx) => ctx.awaitEvent("never:2", { timeout: 0.05 }), { retry: 3 });
  });
  assert.equal(await client.result(await client.spawn("patient", {}), { timeout: 10 }), "timed out on never:1");
  assert.equal(seen, 1);
  const id = await client.spawn("impatient", {});
  await assert.rejects(client.result(id, { timeout: 10 }), (e) => e instanceof TaskFailedError && /never:2/.test(e.message));
  assert.equal((await client.get(id)).error.kind, "permanent", "an escaped await timeout is final");
});

test("durable sleep suspends and resumes", async (t) => {
  let runs = 0;
  const { client } = await setup(t, (w) => {
    w.step("nap", async (_i, ctx) => {
      runs++;
      await ctx.sleep(0.05);
      await ctx.sleepUntil(new Date(Date.now() - 1000));
      return "rested";
    });
  });
  assert.equal(await client.result(await client.spawn("nap", {}), { timeout: 10 }), "rested");
  assert.ok(runs >= 2, `the handler was replayed after the sleep (runs=${runs})`);
});

test("spawn, delegate and delegateParallel run child tasks", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("child", async (input) => {
      if (input.fail) throw new Error("child failed");
      return input.x * 10;
    }, { retry: 1 });
    w.step("parent", async (input, ctx) => {
      const fireAndForget = await ctx.spawn("child", { x: 0 });
      const one = await ctx.delegate("child", { x: input.x });
      const many = await ctx.delegateParallel([
        { handler: "child", input: { x: 1 } },
        ["child", { x: 2 }],
        { handler: "child", input: { fail: true } },
      ]);
      return {
        spawned: typeof fireAndForget,
        one,
        many: many.map((c) => [c.state, c.result ?? c.error.message]),
        ids: many.every((c) => typeof c.taskId === "string"),
      };
    });
  });
  const res = await client.result(await client.spawn("parent", { x: 4 }), { timeout: 20 });
  assert.equal(res.spawned, "string");
  assert.equal(res.one, 40);
  assert.equal(res.ids, true);
  assert.deepEqual(res.many.slice(0, 2), [
    ["completed", 10],
    ["completed", 20],
  ]);
  assert.equal(res.many[2][0], "failed");
  assert.match(res.many[2][1], /^attempt 1 of 1 failed: Error: child failed/, "a failed child is reported, not thrown");
});

test("events emitted by handlers and response events reach waiters", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("announce", async (input, ctx) => ctx.emitEvent(`ready:${input.k}`, { from: ctx.taskId }));
    w.step("listen", async (input, ctx) => ctx.awaitEvent(`ready:${input.k}`));
    w.step("work", async (input) => input.v + 1);
  });
  const listener = await client.spawn("listen", { k: 7 });
  const announcer = await client.spawn("announce", { k: 7 });
  assert.equal(await client.result(announcer, { timeout: 10 }), true);
  assert.deepEqual(await client.result(listener, { timeout: 10 }), { from: announcer });
  await client.spawn("work", { v: 1 }, { responseEvent: "work.done:1" });
  const seen = await client.spawn("listen", { k: "x" });
  const events = await until(async () => (await client.events()).find((e) => e.name === "work.done:1"), 10_000, "response event");
  assert.ok(events, "the response event was emitted");
  await client.emit("ready:x", "now");
  assert.equal(await client.result(seen, { timeout: 10 }), "now");
});

test("ctx exposes the task's metadata and extends its lease", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("meta", async (_i, ctx) => {
      await ctx.heartbeat();
      return {
        headers: ctx.headers,
        priority: ctx.priority,
        step: ctx.stepName,
        hasTimeLeft: typeof ctx.timeLeft === "number" && ctx.timeLeft > 0,
        ids: typeof ctx.taskId === "string" && typeof ctx.stepId === "string",
        cancelled: ctx.isCancelled,
        aborted: ctx.signal.aborted,
      };
    }, { timeout: 30 });
  });
  const id = await client.spawn("meta", {}, { headers: { tenant: "acme" }, priority: 5 });
  assert.deepEqual(await client.result(id, { timeout: 10 }), {
    headers: { tenant: "acme" },
    priority: 5,
    step: "meta",
    hasTimeLeft: true,
    ids: true,
    cancelled: false,
    aborted: false,
  });
});

test("cancelling a task fires ctx.signal with a CancelledError", async (t) => {
  let started;
  const running = new Promise((r) => (started = r));
  let reason;
  const { client } = await setup(t, (w) => {
    w.step("long", async (_i, ctx) => {
      started();
      await new Promise((_, reject) => {
        ctx.signal.addEventListener("abort", () => {
          reason = ctx.signal.reason;
          reject(ctx.signal.reason);
        });
      });
    });
  });
  const id = await client.spawn("long", {});
  await running;
  assert.equal(await client.cancel(id), true);
  await assert.rejects(client.result(id, { timeout: 10 }), TaskCancelledError);
  // The store records the cancel before the signal reaches the handler.
  await until(() => reason !== undefined, 10_000, "the signal to fire");
  assert.ok(reason instanceof CancelledError);
  assert.equal((await client.get(id)).state, "cancelled");
});

test("cancel notices abort a running handler and the one queued behind its full slot never starts", async (t) => {
  // One slot: "gate.hold" holds it awaiting its signal, the next step of the
  // handler waits unclaimed behind it. Cancelling both must abort the first
  // through the core's notice and never start the second.
  const started = [];
  const reasons = [];
  let held;
  const holding = new Promise((r) => (held = r));
  const { client } = await setup(t, (w) => {
    w.step(
      "gate.hold",
      async (input, ctx) => {
        started.push(input.n);
        if (input.n === 3) return "next";
        held();
        await new Promise((_, reject) =>
          ctx.signal.addEventListener("abort", () => {
            reasons.push(ctx.signal.reason);
            reject(ctx.signal.reason);
          }),
        );
      },
      { concurrency: 1 },
    );
  });
  const first = await client.spawn("gate.hold", { n: 1 });
  await holding;
  const queued = await client.spawn("gate.hold", { n: 2 });
  assert.equal(await client.cancel(queued), true);
  assert.equal(await client.cancel(first), true);
  await assert.rejects(client.result(first, { timeout: 10 }), TaskCancelledError);
  await assert.rejects(client.result(queued, { timeout: 10 }), TaskCancelledError);
  await until(() => reasons.length === 1, 10_000, "the running handler's signal to fire");
  assert.ok(reasons[0] instanceof CancelledError);
  assert.equal(reasons[0].message, "the task was cancelled");
  // Another step of the handler gets the freed slot; the cancelled one never ran.
  assert.equal(await client.result(await client.spawn("gate.hold", { n: 3 }), { timeout: 10 }), "next");
  assert.deepEqual(started, [1, 3]);
  assert.equal((await stepOf(client, queued, "gate.hold")).run, 0, "the queued step was never claimed");
});

test("a signal first read after its cancel notice arrived is already aborted", async (t) => {
  let seen;
  const { client } = await setup(t, (w) => {
    w.step("late.look", async (_i, ctx) => {
      // Never touches ctx.signal until well after the cancel reached JS.
      await until(() => ctx.isCancelled, 10_000, "the run to be cancelled");
      await new Promise((r) => setTimeout(r, 300));
      seen = { aborted: ctx.signal.aborted, reason: ctx.signal.reason };
      throw ctx.signal.reason ?? new Error("not aborted");
    });
  });
  const id = await client.spawn("late.look", {});
  await until(async () => (await stepOf(client, id, "late.look"))?.state === "running", 10_000, "the step to run");
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(await client.cancel(id), true);
  await until(() => seen !== undefined, 10_000, "the handler to look at its signal");
  assert.equal(seen.aborted, true);
  assert.ok(seen.reason instanceof CancelledError);
  assert.equal(seen.reason.message, "the task was cancelled");
});

test("a job whose run was cancelled before JS took it is never started", async (t) => {
  // The JS thread is kept busy (a synchronous handler) while the host claims
  // a second step, which waits in the inbox, and another process cancels
  // it: by the time JS could take it, its run was asked to stop and its
  // notice named a job JS did not hold. It must be answered cancelled
  // without its handler ever being called.
  const cli = process.env.SWITCHYARD_CLI;
  if (!cli) return t.skip("SWITCHYARD_CLI not set");
  const { execFileSync } = await import("node:child_process");
  const late = [];
  let victim;
  const { client, store } = await setup(t, (w) => {
    w.step("busy.js", () => {
      const run = (...args) => execFileSync(cli, ["--store", store, "--json", ...args], { encoding: "utf8" });
      const spawned = JSON.parse(run("spawn", "busy.victim", "--input", "{}"));
      victim = spawned.task_id ?? spawned.id;
      // Until the host has claimed the victim (it sits in the inbox: JS is busy here).
      const deadline = Date.now() + 10_000;
      while (JSON.parse(run("tasks", "show", victim)).steps?.[0]?.state !== "running") {
        if (Date.now() > deadline) throw new Error("the victim was never claimed");
      }
      run("cancel", victim);
      // Long enough for the host's cancellation poll (every 0.1 s) to stop
      // the run; the core's 2 s cancellation grace counts from then, so the
      // job is still waiting, not dropped, when JS is free again.
      const until = Date.now() + 1500;
      while (Date.now() < until);
      return "done";
    });
    w.step("busy.victim", (_i, ctx) => {
      late.push(ctx.signal.aborted);
      return "ran";
    });
  });
  assert.equal(await client.result(await client.spawn("busy.js", {}), { timeout: 15 }), "done");
  await assert.rejects(client.result(victim, { timeout: 10 }), TaskCancelledError);
  assert.deepEqual(late, [], "the cancelled job's handler was called");
});

test("a handler's timeout fires ctx.signal and fails the attempt", async (t) => {
  const reasons = [];
  const { client } = await setup(t, (w) => {
    w.step(
      "too.slow",
      async (_i, ctx) => {
        await new Promise((_, reject) =>
          ctx.signal.addEventListener("abort", () => {
            reasons.push(ctx.signal.reason.message);
            reject(ctx.signal.reason);
          }),
        );
      },
      { timeout: 0.1, retry: 1 },
    );
  });
  const id = await client.spawn("too.slow", {});
  await assert.rejects(client.result(id, { timeout: 10 }), TaskFailedError);
  assert.match((await client.get(id)).error.message, /timed out|timeout/i);
  await until(() => reasons.length === 1, 10_000, "the signal to fire");
  assert.match(reasons[0], /timeout passed/);
});

test("close() fires ctx.signal of handlers still running after the grace period", async (t) => {
  const { url } = tempStore(t);
  const { Worker, Client } = await import("switchyard");
  const worker = new Worker({ store: url, shutdownGrace: 0.1 });
  let started;
  const running = new Promise((r) => (started = r));
  let reason;
  worker.step("stubborn", async (_i, ctx) => {
    started();
    await new Promise((resolve) =>
      ctx.signal.addEventListener("abort", () => {
        reason = ctx.signal.reason;
        resolve();
      }),
    );
    return "too late";
  });
  await worker.start();
  const client = new Client({ store: url });
  const id = await client.spawn("stubborn", {});
  await running;
  await worker.close();
  await until(() => reason !== undefined, 10_000, "the signal to fire");
  assert.ok(reason instanceof CancelledError);
  assert.match(reason.message, /shut down/);
  const rec = await client.get(id);
  assert.notEqual(rec.state, "completed", "the step was handed back, not completed");
});

test("durable operations reject bad input with errors naming it", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("bad.ops", async (_i, ctx) => {
      const errors = [];
      const expectFail = async (what, f) => {
        try {
          await f();
          errors.push(`${what}: no error`);
        } catch (e) {
          if (isSuspension(e)) throw e;
          errors.push(`${what}: ${e.constructor.name}: ${e.message}`);
        }
      };
      await expectFail("awaitEvent", () => ctx.awaitEvent("x", { timeout: -1 }));
      await expectFail("sleep", () => ctx.sleep(Number.NaN));
      await expectFail("sleepUntil", () => ctx.sleepUntil("tomorrow"));
      await expectFail("delegateParallel", () => ctx.delegateParallel([{ input: 1 }]));
      await expectFail("checkpoint", () => ctx.checkpoint("big", () => 10n));
      await expectFail("emitEvent", () => ctx.emitEvent("", 1));
      return errors;
    });
  });
  const errors = await client.result(await client.spawn("bad.ops", {}), { timeout: 10 });
  assert.equal(errors.length, 6);
  assert.match(errors[0], /^awaitEvent: InvalidInput: awaitEvent timeout must be a non-negative number/);
  assert.match(errors[1], /^sleep: InvalidInput: sleep must be a non-negative number/);
  assert.match(errors[2], /^sleepUntil: InvalidInput: sleepUntil needs a Date/);
  assert.match(errors[3], /^delegateParallel: InvalidInput: .*delegate_parallel: child #0 needs a string `handler`/);
  assert.match(errors[4], /^checkpoint: InvalidInput: checkpoint `big` value is not JSON-serialisable/);
  assert.match(errors[5], /^emitEvent: \w+: .*(name|empty)/i);
});

test("absurd durations throw InvalidInput from the core and do not crash", async (t) => {
  // Issue item 5: 1e20 s panicked in Rust (Duration::from_secs_f64);
  // negative, NaN and infinite ones are refused too.
  const { client } = await setup(t, (w) => {
    w.step("bad.durations", async (_i, ctx) => {
      const errors = [];
      const expectFail = async (what, f) => {
        try {
          await f();
          errors.push(`${what}: no error`);
        } catch (e) {
          if (isSuspension(e)) throw e;
          errors.push(`${what}: ${e.constructor.name}: ${e.message}`);
        }
      };
      for (const timeout of [-1, Number.NaN, Infinity, 1e20]) {
        await expectFail(`awaitEvent ${timeout}`, () => ctx.awaitEvent("never", { timeout }));
      }
      await expectFail("sleep 1e20", () => ctx.sleep(1e20));
      return errors;
    });
  });
  const errors = await client.result(await client.spawn("bad.durations", {}), { timeout: 10 });
  assert.equal(errors.length, 5, JSON.stringify(errors));
  for (const e of errors.slice(0, 3)) {
    assert.match(e, /: InvalidInput: awaitEvent timeout must be a non-negative number/);
  }
  // String(1e20) is "100000000000000000000".
  assert.match(errors[3], /^awaitEvent 100000000000000000000: InvalidInput: .*awaitEvent timeout must be at most 100 years/);
  assert.match(errors[4], /^sleep 1e20: InvalidInput: .*sleep duration must be at most 100 years/);
});

test("a step that awaits 50 events or sleeps 50 times costs no attempt", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("approvals", async (input, ctx) => {
      let sum = 0;
      for (let i = 0; i < 50; i++) sum += await ctx.awaitEvent(`${input.prefix}-${i}`);
      return { sum, attempt: ctx.attempt, run: ctx.run };
    });
    w.step("naps", async (_i, ctx) => {
      for (let i = 0; i < 50; i++) await ctx.sleep(0.02);
      return { attempt: ctx.attempt, run: ctx.run };
    });
  });
  const sleeper = await client.spawn("naps", {});
  const id = await client.spawn("approvals", { prefix: "fifty" });
  for (let i = 0; i < 50; i++) {
    await until(async () => {
      const s = await stepOf(client, id, "approvals");
      return s?.state === "suspended" && s.run === i + 1 && s.attempt === 0;
    }, 10_000, `suspension ${i + 1}`);
    await client.emit(`fifty-${i}`, 1);
  }
  assert.deepEqual(await client.result(id, { timeout: 30 }), { sum: 50, attempt: 1, run: 51 });
  const out = await client.result(sleeper, { timeout: 30 });
  assert.equal(out.attempt, 1);
  // A sleep whose time has already come returns without suspending.
  assert.ok(out.run >= 2 && out.run <= 51, `runs: ${out.run}`);
});

test("cancelling one task of a running batch aborts only its item's signal; the others complete", async (t) => {
  let batchSize;
  let started;
  const running = new Promise((r) => (started = r));
  let release;
  const released = new Promise((r) => (release = r));
  const aborted = new Map();
  const { client } = await setup(t, (w) => {
    w.batch(
      "batch.hold",
      async (items) => {
        batchSize = items.length;
        started();
        return Promise.all(
          items.map(
            ({ input, ctx }) =>
              new Promise((resolve) => {
                ctx.signal.addEventListener("abort", () => {
                  aborted.set(input.i, ctx.signal.reason);
                  resolve(ctx.signal.reason);
                });
                released.then(() => resolve({ done: input.i }));
              }),
          ),
        );
      },
      { maxBatch: 3, linger: 1 },
    );
  });
  const ids = await client.spawnMany([0, 1, 2].map((i) => ({ handler: "batch.hold", input: { i } })));
  await running;
  assert.equal(batchSize, 3, "the three tasks run as one batch");
  assert.equal(await client.cancel(ids[1]), true);
  await until(() => aborted.has(1), 10_000, "the cancelled item's signal to fire");
  assert.ok(aborted.get(1) instanceof CancelledError);
  assert.equal(aborted.get(1).message, "the task was cancelled");
  // The other items' runs go on: their signals have not fired.
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual([...aborted.keys()], [1]);
  release();
  assert.deepEqual(await client.result(ids[0], { timeout: 10 }), { done: 0 });
  assert.deepEqual(await client.result(ids[2], { timeout: 10 }), { done: 2 });
  await assert.rejects(client.result(ids[1], { timeout: 10 }), TaskCancelledError);
  assert.deepEqual([...aborted.keys()], [1]);
});

test("ctx.spawn with responseEvent: the parent awaits its child's outcome as an event", async (t) => {
  const { client } = await setup(t, (w) => {
    w.step("child", async (input) => {
      if (input.fail) throw new PermanentErrorLike("child says no");
      return input.x * 2;
    }, { retry: 1 });
    w.step("parent", async (input, ctx) => {
      const name = `child.done:${ctx.taskId}`;
      const child = await ctx.spawn("child", input, { responseEvent: name });
      const event = await ctx.awaitEvent(name, { timeout: 30 });
      return { child, event };
    });
    w.step("badName", async (_input, ctx) => {
      try {
        await ctx.spawn("child", { x: 1 }, { responseEvent: "" });
        return "accepted";
      } catch (e) {
        return `${e.constructor.name}: ${e.message}`;
      }
    });
  });
  let r = await client.result(await client.spawn("parent", { x: 21 }), { timeout: 30 });
  assert.deepEqual(r.event, { task_id: r.child, state: "completed", result: 42, error: null });
  r = await client.result(await client.spawn("parent", { fail: true }), { timeout: 30 });
  assert.equal(r.event.task_id, r.child);
  assert.equal(r.event.state, "failed");
  assert.equal(r.event.result, null);
  assert.match(r.event.error.message, /child says no/);
  const refused = await client.result(await client.spawn("badName", {}), { timeout: 30 });
  assert.match(refused, /^InvalidInput: .*response_event/);
});

class PermanentErrorLike extends Error {}

test("ctx.setStatus routes the step; a status that is no name throws InvalidInput", async (t) => {
  const { client } = await setup(t, (w) => {
    w.decision("plan", async (input) =>
      Decision.create([step("check", { handler: "check", input, routes: { late: [step("chase", { handler: "chase" })] } })]),
    );
    w.step("check", async (_input, ctx) => {
      let bad = "accepted";
      try {
        ctx.setStatus("");
      } catch (e) {
        bad = `${e instanceof InvalidInput}: ${e.message}`;
      }
      ctx.setStatus("late");
      return { bad };
    });
    w.step("chase", async (_input, ctx) => ctx.dependencyResults());
  });
  const id = await client.spawn("plan", {});
  const r = await client.result(id, { timeout: 30 });
  assert.match(r.check.bad, /^true: .*status/);
  const steps = Object.fromEntries((await client.inspect(id)).steps.map((s) => [s.name, s]));
  assert.equal(steps.check.status, "late");
  assert.deepEqual(Object.keys(steps.check.routes), ["late"]);
  assert.equal(steps.check.routes.late[0].name, "chase");
  assert.equal(steps.chase.state, "completed");
});
