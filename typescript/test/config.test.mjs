import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Client, ConfigError, Worker } from "switchyard";
import { tempStore, until } from "./helpers.mjs";

/** Runs `fn` with the environment variables `vars` set, restoring them after. */
async function withEnv(vars, fn) {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  Object.assign(process.env, vars);
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

function configFile(dir, name, text) {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

test("Worker.fromConfig uses the configured store, host name and concurrency", async (t) => {
  const { url, dir } = tempStore(t);
  const path = configFile(dir, "switchyard.toml", `[store]\nurl = "${url}"\n\n[host]\nname = "node-from-config"\nconcurrency = 3\n`);
  const worker = Worker.fromConfig(path, { handleSignals: false });
  assert.equal(worker.store, url);
  assert.equal(worker.concurrency, 3);
  worker.step("cfg.echo", (input) => ({ echo: input }));
  await worker.start();
  t.after(() => worker.stop());
  const client = new Client({ store: url });
  const id = await client.spawn("cfg.echo", { n: 1 });
  assert.deepEqual(await client.result(id, { timeout: 10 }), { echo: { n: 1 } });
  const hosts = await client.workers();
  const mine = hosts.find((h) => h.id === worker.hostId);
  assert.ok(mine, JSON.stringify(hosts));
  assert.equal(mine.name, "node-from-config");
});

test("Worker.fromConfig() reads SWITCHYARD_CONFIG and the SWITCHYARD_* overrides", async (t) => {
  const { url, dir } = tempStore(t);
  const path = configFile(dir, "env.toml", `[store]\nurl = "${url}"\n\n[host]\nconcurrency = 3\n`);
  await withEnv({ SWITCHYARD_CONFIG: path, SWITCHYARD_HOST__CONCURRENCY: "5", SWITCHYARD_HOST__NAME: "node-env" }, async () => {
    const worker = Worker.fromConfig(undefined, { handleSignals: false });
    assert.equal(worker.store, url);
    assert.equal(worker.concurrency, 5);
    worker.step("cfg.noop", () => null);
    await worker.start();
    t.after(() => worker.stop());
    const client = new Client({ store: url });
    const hosts = await until(async () => (await client.workers()).find((h) => h.id === worker.hostId), 5_000, "the host");
    assert.equal(hosts.name, "node-env");
  });
});

test("Worker.fromConfig refuses unknown keys and wrong types, naming the key and the file", async (t) => {
  const { dir } = tempStore(t);
  const typo = configFile(dir, "typo.toml", "[host]\nconcurency = 3\n");
  assert.throws(
    () => Worker.fromConfig(typo),
    (e) => e instanceof ConfigError && e.message.includes("host.concurency") && e.message.includes("typo.toml"),
  );
  const type = configFile(dir, "type.toml", '[host]\nlease = "whenever"\n');
  assert.throws(
    () => Worker.fromConfig(type),
    (e) => e instanceof ConfigError && e.message.includes("host.lease") && e.message.includes("type.toml"),
  );
  await withEnv({ SWITCHYARD_HOST__CONCURRENCY: "0" }, () => {
    assert.throws(
      () => Worker.fromConfig(join(dir, "missing.toml")),
      (e) => e instanceof ConfigError && e.message.includes("missing.toml"),
    );
    const ok = configFile(dir, "ok.toml", "[host]\nconcurrency = 2\n");
    assert.throws(
      () => Worker.fromConfig(ok),
      (e) => e instanceof ConfigError && e.message.includes("SWITCHYARD_HOST__CONCURRENCY"),
    );
  });
  assert.throws(() => Worker.fromConfig(42), /path must be a string/);
});
