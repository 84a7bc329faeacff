// Hostile values from handlers: whatever a handler throws, rejects with or
// returns, only its own step fails, with a message saying what it was, and
// the host (and the steps answered with it) carries on.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker, Client, TaskFailedError } from "switchyard";
import { deferred, tempStore } from "./helpers.mjs";

/** A Proxy whose every trap throws (even `typeof` works on it, nothing else does). */
function hostileProxy() {
  const boom = () => {
    throw new Error("trap");
  };
  const traps = {};
  for (const t of [
    "apply", "construct", "defineProperty", "deleteProperty", "get", "getOwnPropertyDescriptor",
    "getPrototypeOf", "has", "isExtensible", "ownKeys", "preventExtensions", "set", "setPrototypeOf",
  ]) {
    traps[t] = boom;
  }
  return new Proxy({}, traps);
}

/** An Error whose `message` (and `name`) getters throw. */
function errorWithHostileMessage() {
  const e = new Error("hidden");
  Object.defineProperty(e, "message", { get() { throw new Error("no message for you"); } });
  Object.defineProperty(e, "name", { get() { throw hostileProxy(); } });
  return e;
}

const HOSTILE = {
  null: () => null,
  undefined: () => undefined,
  number: () => 42,
  badMessage: errorWithHostileMessage,
  proxy: hostileProxy,
};

/** What each hostile step's stored error must say. */
const EXPECTED = {
  null: /non-Error value: null/,
  undefined: /non-Error value: undefined/,
  number: /non-Error value: 42/,
  badMessage: /<unrenderable/,
  proxy: /<unrenderable rejection: Proxy>/,
  "toJSON.throws": /not JSON-serialisable: converting it to JSON .*threw Error: toJSON says no/,
  "toJSON.throws.null": /not JSON-serialisable: converting it to JSON .*threw null/,
  "toJSON.throws.proxy": /not JSON-serialisable: converting it to JSON .*threw <unrenderable exception: Proxy>/,
};

/** Tasks spawned before the worker starts, so its first claim (and, as far
 * as timing allows, one dispatch batch) holds all of them. */
async function startWith(t, register, tasks) {
  const { url } = tempStore(t);
  const client = new Client({ store: url });
  const ids = await client.spawnMany(tasks);
  const worker = new Worker({ store: url, concurrency: 64, shutdownGrace: 1 });
  register(worker);
  await worker.start();
  t.after(() => worker.close());
  return { client, ids };
}

async function failure(client, id) {
  const e = await client.result(id, { timeout: 10 }).then(
    (v) => assert.fail(`expected a failure, got ${JSON.stringify(v)}`),
    (e) => e,
  );
  assert.ok(e instanceof TaskFailedError, String(e));
  return e.error;
}

test("hostile rejections and toJSON fail only their own step; results flushed with them are kept", async (t) => {
  const gate = deferred();
  const tasks = [];
  const { client, ids } = await startWith(
    t,
    (w) => {
      for (const [k, make] of Object.entries(HOSTILE)) {
        w.step(`reject.${k}`, async () => {
          await gate.promise;
          throw make();
        }, { retry: 1 });
      }
      w.step("toJSON.throws", async () => {
        await gate.promise;
        return { toJSON() { throw new Error("toJSON says no"); } };
      }, { retry: 1 });
      w.step("toJSON.throws.null", async () => {
        await gate.promise;
        return { toJSON() { throw null; } };
      }, { retry: 1 });
      w.step("toJSON.throws.proxy", async () => {
        await gate.promise;
        return { toJSON() { throw hostileProxy(); } };
      }, { retry: 1 });
      // Settles in the same turn as the hostile ones: answered in one flush.
      w.step("canary", async (input) => {
        await gate.promise;
        return { ok: input.i };
      }, { retry: 1 });
    },
    (() => {
      for (const k of [...Object.keys(HOSTILE).map((k) => `reject.${k}`), "toJSON.throws", "toJSON.throws.null", "toJSON.throws.proxy"]) {
        tasks.push({ handler: k, input: { i: tasks.length } }, { handler: "canary", input: { i: tasks.length + 1 } });
      }
      return tasks;
    })(),
  );
  // Every handler has started (each awaits the gate) before they all settle.
  await new Promise((r) => setTimeout(r, 500));
  gate.resolve();
  for (const [i, id] of ids.entries()) {
    const { handler, input } = tasks[i];
    if (handler === "canary") {
      assert.deepEqual(await client.result(id, { timeout: 10 }), { ok: input.i });
      continue;
    }
    const err = await failure(client, id);
    const want = EXPECTED[handler.replace(/^reject\./, "")];
    assert.match(err.message, want, `${handler}: ${err.message}`);
    if (handler !== "reject.badMessage") {
      assert.match(err.message, new RegExp(`\`${handler.replace(/\./g, "\\.")}\``), `names the handler: ${err.message}`);
    }
  }
  // The host is still serving.
  assert.deepEqual(await client.result(await client.spawn("canary", { i: 99 }), { timeout: 10 }), { ok: 99 });
});

test("a sync handler throwing a hostile value fails only its own step, not its dispatch batch", async (t) => {
  const tasks = [];
  for (let i = 0; i < 12; i++) {
    tasks.push({ handler: "canary", input: { i } });
    if (i % 3 === 1) tasks.push({ handler: "sync.proxy", input: {} });
    if (i % 3 === 2) tasks.push({ handler: "sync.badMessage", input: {} });
    if (i % 4 === 0) tasks.push({ handler: "sync.null", input: {} });
  }
  const { client, ids } = await startWith(
    t,
    (w) => {
      w.step("sync.proxy", () => {
        throw hostileProxy();
      }, { retry: 1 });
      w.step("sync.badMessage", () => {
        throw errorWithHostileMessage();
      }, { retry: 1 });
      w.step("sync.null", () => {
        throw null;
      }, { retry: 1 });
      // Sync too: a canary answered before the hostile throw in the same batch
      // must keep its result.
      w.step("canary", (input) => ({ ok: input.i }), { retry: 1 });
    },
    tasks,
  );
  for (const [i, id] of ids.entries()) {
    const { handler, input } = tasks[i];
    if (handler === "canary") {
      assert.deepEqual(await client.result(id, { timeout: 10 }), { ok: input.i }, `canary ${input.i}`);
      continue;
    }
    const err = await failure(client, id);
    assert.match(err.message, EXPECTED[handler.slice("sync.".length)], `${handler}: ${err.message}`);
    assert.doesNotMatch(err.message, /dispatcher failed/);
  }
});

test("results JSON cannot represent fail their own step permanently, naming the type", async (t) => {
  const circular = { a: 1 };
  circular.self = circular;
  const cases = {
    symbol: [() => Symbol("s"), /returned a Symbol/],
    function: [() => () => 1, /returned a function/],
    nan: [() => NaN, /returned NaN/],
    infinity: [() => -Infinity, /returned -Infinity/],
    bigint: [() => 10n, /returned a BigInt.*String\(/],
    map: [() => new Map([["a", 1]]), /returned a Map.*Object\.fromEntries/],
    set: [() => new Set([1]), /returned a Set.*\[\.\.\.set\]|returned a Set.*Array\.from/],
    circular: [() => circular, /circular/],
    "nested.nan": [() => ({ stats: { mean: NaN } }), /NaN at \.stats\.mean/],
    "nested.map": [() => ({ items: [1, new Map()] }), /a Map at \.items\[1\]/],
    "nested.function": [() => ({ cb() {} }), /a function at \.cb/],
    "nested.symbol": [() => [Symbol.iterator], /a Symbol at \[0\]/],
  };
  const calls = {};
  const { client, ids } = await startWith(
    t,
    (w) => {
      for (const [k, [make]] of Object.entries(cases)) {
        w.step(`ret.${k}`, async () => {
          calls[k] = (calls[k] ?? 0) + 1;
          return make();
        }, { retry: { maxAttempts: 3, initialBackoff: 0, maxBackoff: 0 } });
      }
      // What JSON does represent still works, including an absent result
      // and optional fields left undefined.
      w.step("ret.fine", async () => ({ a: 1, missing: undefined, when: new Date(0), list: [1, "x", null, true] }));
      w.step("ret.nothing", async () => undefined);
      w.batch("ret.batch", async (items) => items.map(({ input }) => (input.bad ? new Set() : input.i)), { maxBatch: 8, linger: 0.2 });
    },
    [
      ...Object.keys(cases).map((k) => ({ handler: `ret.${k}`, input: {} })),
      { handler: "ret.fine", input: {} },
      { handler: "ret.nothing", input: {} },
      { handler: "ret.batch", input: { i: 1 } },
      { handler: "ret.batch", input: { bad: true } },
      { handler: "ret.batch", input: { i: 3 } },
    ],
  );
  const n = Object.keys(cases).length;
  for (const [i, [k, [, want]]] of Object.entries(cases).entries()) {
    const err = await failure(client, ids[i]);
    assert.match(err.message, want, `${k}: ${err.message}`);
    assert.match(err.message, /no JSON form/, `${k}: ${err.message}`);
    assert.equal(err.kind, "permanent", `${k} fails permanently`);
    assert.equal(calls[k], 1, `${k} is not retried`);
  }
  assert.deepEqual(await client.result(ids[n], { timeout: 10 }), {
    a: 1,
    when: "1970-01-01T00:00:00.000Z",
    list: [1, "x", null, true],
  });
  assert.equal(await client.result(ids[n + 1], { timeout: 10 }), null);
  assert.equal(await client.result(ids[n + 2], { timeout: 10 }), 1);
  assert.match((await failure(client, ids[n + 3])).message, /returned a Set/);
  assert.equal(await client.result(ids[n + 4], { timeout: 10 }), 3);
});
