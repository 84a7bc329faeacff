#!/usr/bin/env node
// Node counterpart of `switchyard bench` (noop workload): prints one JSON
// line on stdout, progress on stderr.
//
//   node bench/node_bench.mjs --store sqlite --steps 100000 [--sync]
//
// Imports the installed `switchyard` package (`make node-package` installs
// one into target/node-scratch; bench/run --lang node runs it from there).
// Two phases, as in the Rust and Python benchmarks:
//
// 1. Throughput: `--steps N` tasks are spawned with `Client.spawnMany` in
//    batches of `--batch B` while one worker runs them `--concurrency C` at a
//    time (default 512, as in the Rust benchmark) with an async no-op
//    handler; the clock runs from the first spawn until the handler has
//    counted N runs and the store confirms N completed steps.
// 2. Latency: `--trials` single tasks one after another on the idle worker,
//    from the start of the spawn call to the start of the handler.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { Worker, Client } from "switchyard";

const { values } = parseArgs({
  options: {
    store: { type: "string", default: "sqlite" },
    steps: { type: "string", default: "100000" },
    concurrency: { type: "string", default: "512" },
    batch: { type: "string", default: "1000" },
    trials: { type: "string", default: "200" },
    sync: { type: "boolean", default: false },
  },
});
const steps = Number(values.steps);
const concurrency = Number(values.concurrency);
const batch = Number(values.batch);
const trials = Number(values.trials);
const progress = (m) => process.stderr.write(`${m}\n`);

let url = values.store;
let tmp;
if (url === "sqlite") {
  tmp = mkdtempSync(join(tmpdir(), "switchyard-bench-"));
  url = `sqlite:${join(tmp, "bench.db")}`;
}
const kind = url.split(":", 1)[0];
const run = randomUUID().slice(0, 8);
const tpName = `bench.${run}.noop`;
const latName = `bench.${run}.latency`;

const worker = new Worker({ store: url, concurrency: concurrency + 8, shutdownGrace: 2 });
const client = new Client({ store: url });
let counted = 0;
let allRan;
const allRanP = new Promise((r) => (allRan = r));
const count = () => {
  if (++counted === steps) allRan();
};
const started = new Map();
if (values.sync) {
  worker.step(tpName, () => count(), { concurrency });
} else {
  worker.step(tpName, async () => count(), { concurrency });
}
worker.step(latName, async (input) => started.get(input.i)?.(performance.now()), { concurrency: 8 });

function percentile(samples, p) {
  if (samples.length === 0) return null;
  const s = [...samples].sort((a, b) => a - b);
  const i = Math.min(s.length - 1, Math.max(0, Math.round((p / 100) * (s.length - 1))));
  return Math.round(s[i] * 1000) / 1000;
}

await worker.start();
let seconds;
const samples = [];
try {
  const base = (await client.countSteps()).completed ?? 0;
  progress(`throughput: ${steps} steps, ${values.sync ? "sync" : "async"} handler, store ${kind}`);
  const t0 = performance.now();
  for (let start = 0; start < steps; start += batch) {
    const n = Math.min(batch, steps - start);
    await client.spawnMany(Array.from({ length: n }, () => ({ handler: tpName, input: null })));
  }
  await allRanP;
  while (((await client.countSteps()).completed ?? 0) - base < steps) {
    await new Promise((r) => setTimeout(r, 5));
  }
  seconds = (performance.now() - t0) / 1000;

  progress(`latency: ${trials} trials on an idle host`);
  for (let i = 0; i < trials; i++) {
    const began = new Promise((r) => started.set(i, r));
    const t = performance.now();
    const id = await client.spawn(latName, { i });
    samples.push((await began) - t);
    await client.wait(id, { timeout: 30 });
  }
} finally {
  await worker.close();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
}

console.log(
  JSON.stringify({
    lang: "node",
    store: kind,
    workload: values.sync ? "noop" : "noop-async",
    steps,
    concurrency,
    batch,
    seconds: Math.round(seconds * 1000) / 1000,
    steps_per_sec: Math.round(steps / seconds),
    trials: samples.length,
    p50_ms: percentile(samples, 50),
    p99_ms: percentile(samples, 99),
  }),
);
