// The dashboard in a real browser (`make test-dashboard`): the real
// `switchyard serve` binary on a temporary SQLite store that a real Rust host
// (crates/switchyard-serve/examples/dashboard_seed.rs) fills with tasks in
// every state, driven in headless Chromium (Debian's /usr/bin/chromium) by
// playwright-core. Servers listen on 127.0.0.1 free ports and are stopped at
// the end, also on failure. Screenshots go to target/dashboard-screenshots/.
// Then the tasks page's first render is measured over a store of
// DASH_BULK_TASKS (default 1,000,000) tasks and printed, not asserted.
//
// Environment: SWITCHYARD_BIN, DASH_SEED_BIN, DASH_PLAYWRIGHT_DIR (where
// playwright-core is installed), DASH_CHROMIUM (default /usr/bin/chromium),
// DASH_SCREENSHOTS, DASH_BULK_TASKS (0: skip the measurement).

import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';

const need = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BIN = need('SWITCHYARD_BIN');
const SEED = need('DASH_SEED_BIN');
const require = createRequire(path.join(need('DASH_PLAYWRIGHT_DIR'), 'package.json'));
const { chromium } = require('playwright-core');
const CHROMIUM = process.env.DASH_CHROMIUM || '/usr/bin/chromium';
const SHOTS = process.env.DASH_SCREENSHOTS || 'target/dashboard-screenshots';
const BULK = Number(process.env.DASH_BULK_TASKS ?? 1000000);
const READ = 'dash-read-token-0123456789';
const WRITE = 'dash-write-token-0123456789';

const children = [];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sy-dash-'));
let browser = null;
let lastPage = null;
const started = Date.now();

function cleanup() {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
  }
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

function log(...a) {
  console.log(`[dashboard ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Starts a process; resolves with it and its first stdout line matching `ready`. */
function start(cmd, args, ready, timeoutMs) {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: tmp });
    children.push(c);
    let out = '';
    let err = '';
    const timer = setTimeout(() => reject(new Error(`${path.basename(cmd)} not ready after ${timeoutMs} ms\n${out}\n${err}`)), timeoutMs);
    const check = () => {
      for (const line of (out + err).split('\n')) {
        if (ready(line)) {
          clearTimeout(timer);
          resolve({ proc: c, line });
          return;
        }
      }
    };
    c.stdout.on('data', (d) => { out += d; check(); });
    c.stderr.on('data', (d) => { err += d; check(); });
    c.on('exit', (code) => {
      check();
      clearTimeout(timer);
      reject(new Error(`${path.basename(cmd)} exited (${code}) before it was ready\n${out}\n${err}`));
    });
  });
}

async function serve(storeUrl) {
  const port = await freePort();
  const config = path.join(tmp, 'switchyard.toml');
  fs.writeFileSync(config, `[[serve.tokens]]\nname = "dash-read"\nsecret = "${READ}"\nscope = "read"\n[[serve.tokens]]\nname = "dash-write"\nsecret = "${WRITE}"\nscope = "write"\n`);
  const s = await start(BIN, ['--config', config, '--store', storeUrl, 'serve', '--listen', `127.0.0.1:${port}`], (l) => l.includes('listening on'), 30000);
  return { proc: s.proc, base: `http://127.0.0.1:${port}` };
}

async function stop(proc) {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const done = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGTERM');
  await done;
}

async function shot(page, name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function signIn(page, base, token) {
  await page.goto(`${base}/`);
  await page.getByRole('button', { name: 'Token', exact: true }).click();
  await page.getByLabel('Bearer token').fill(token);
  await page.getByRole('button', { name: 'Use token' }).click();
  await page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
}

/** Loads a page of the dashboard afresh (a hash change alone would leave
 * the previous page's content in place until the new one renders). */
async function visit(page, url) {
  await page.goto('about:blank');
  await page.goto(url);
}

const rows = (page, table) => page.locator(`${table} tbody tr`);

async function status(page, re) {
  await page.locator('#status').filter({ hasText: re }).waitFor({ timeout: 15000 });
}

async function main() {
  fs.rmSync(path.join(SHOTS, 'failure.png'), { force: true });
  // --- the store, the host and the server --------------------------------
  const storeUrl = `sqlite:${path.join(tmp, 'dash.db')}`;
  const seed = await start(SEED, ['--store', storeUrl], (l) => l.startsWith('{"'), 120000);
  const ids = JSON.parse(seed.line);
  log('seeded', ids);
  const { proc: server, base } = await serve(storeUrl);
  log('serving on', base);

  // The assets: no token, their types, a CSP without remote origins, caching.
  for (const [p, type] of [['/', 'text/html'], ['/assets/app.js', 'text/javascript'], ['/assets/style.css', 'text/css']]) {
    const r = await fetch(base + p);
    assert.equal(r.status, 200, p);
    assert.ok(r.headers.get('content-type').startsWith(type), `${p}: ${r.headers.get('content-type')}`);
    const csp = r.headers.get('content-security-policy') || '';
    assert.match(csp, /default-src 'none'/, p);
    assert.match(csp, /script-src 'self'/, p);
    assert.doesNotMatch(csp, /https?:|\*|unsafe-inline|unsafe-eval/, `${p}: ${csp}`);
    assert.equal(r.headers.get('cache-control'), 'no-cache', p);
    const etag = r.headers.get('etag');
    assert.ok(etag, p);
    const again = await fetch(base + p, { headers: { 'If-None-Match': etag } });
    assert.equal(again.status, 304, `${p} revalidates`);
  }
  assert.equal((await fetch(`${base}/assets/nope.js`)).status, 404);
  assert.equal((await fetch(`${base}/api/v1/tasks`)).status, 401, 'the data needs a token');

  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  lastPage = page;
  const remote = [];
  page.on('request', (r) => { if (!r.url().startsWith(base)) remote.push(r.url()); });
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error' && !/40[13]/.test(m.text())) consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));

  // --- read token: look at every page --------------------------------------
  await page.goto(`${base}/`);
  await page.getByLabel('Bearer token').fill('not-a-token-at-all');
  await page.getByRole('button', { name: 'Use token' }).click();
  await page.getByText('That token was refused').waitFor();
  await signIn(page, base, READ);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('switchyard.token')), READ, 'the token is kept for the tab');

  // Overview.
  const counts = page.locator('#state-counts');
  await counts.waitFor();
  assert.match(await counts.innerText(), /4\s+failed/);
  assert.match(await counts.innerText(), /1\s+cancelled/);
  assert.match(await counts.innerText(), /1\s+steps suspended/);
  assert.match(await page.locator('svg.chart desc').textContent(), /completed, 4 failed, 1 cancelled/);
  assert.ok(await page.locator('svg.chart rect.bar-failed').count() >= 60, 'a bar per minute');
  assert.match(await page.locator('#hosts-by-language').innerText(), /rust\s+1/);
  assert.match(await page.locator('#oldest-ready').innerText(), /legacy\.export/);
  assert.match(await page.locator('#tasks-by-handler').innerText(), /payment\.charge/);
  await shot(page, '1-overview');

  // Keyboard: the skip link and the navigation are reachable with Tab.
  await page.reload();
  await page.locator('#state-counts').waitFor();
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Overview');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Tasks', level: 1 }).waitFor();

  // Tasks: every control labelled, filters combined and kept in the URL.
  const unlabelled = await page.evaluate(() => [...document.querySelectorAll('main input, main select, main textarea')].filter((e) => !e.labels || !e.labels.length).map((e) => e.id || e.name));
  assert.deepEqual(unlabelled, [], 'every control has a label');
  await rows(page, '#tasks-table').first().waitFor();
  assert.equal(await rows(page, '#tasks-table').count(), 50, 'a page of 50');
  const firstPage = await rows(page, '#tasks-table').first().innerText();
  await page.locator('#next-page').click();
  await page.waitForFunction(() => location.hash.includes('cursor='));
  await page.getByText('(a later page)').waitFor();
  assert.notEqual(await rows(page, '#tasks-table').first().innerText(), firstPage, 'the next page is another page');
  await visit(page, `${base}/#/tasks`);
  await page.getByLabel('State').selectOption('failed');
  await page.getByLabel('Handler').fill('payment.charge');
  await page.getByLabel('Root tasks only').check();
  await page.getByRole('button', { name: 'Apply' }).click();
  await page.waitForFunction(() => location.hash.includes('state=failed') && location.hash.includes('handler=payment.charge') && location.hash.includes('root=true'));
  await page.getByText('3 tasks').waitFor();
  const filteredUrl = page.url();
  await page.reload();
  await page.getByText('3 tasks').waitFor();
  assert.equal(await page.getByLabel('State').inputValue(), 'failed', 'the filter comes back from the URL');
  for (const r of await rows(page, '#tasks-table').all()) assert.match(await r.innerText(), /payment\.charge[\s\S]*failed/);
  await shot(page, '2-tasks-filtered');
  await visit(page, `${base}/#/tasks?state=failed&handler=report.build`);
  await page.getByText('1 task', { exact: true }).waitFor();
  await visit(page, `${base}/#/tasks?state=cancelled`);
  await page.getByText('1 task', { exact: true }).waitFor();
  assert.match(await rows(page, '#tasks-table').first().innerText(), /mail\.wait[\s\S]*cancelled/);
  await visit(page, `${base}/#/tasks?state=suspended&root=true`);
  await page.getByText('1 task', { exact: true }).waitFor();
  assert.match(await rows(page, '#tasks-table').first().innerText(), /invoice\.parent/);
  await visit(page, `${base}/#/tasks?q=order-7`);
  await page.getByText('1 task', { exact: true }).waitFor();
  assert.match(await rows(page, '#tasks-table').first().innerText(), /order\.fulfil/);
  await visit(page, `${base}/#/tasks?q=${ids.report}`);
  await page.getByText('1 task', { exact: true }).waitFor();
  assert.match(await rows(page, '#tasks-table').first().innerText(), /report\.build/);
  await visit(page, `${base}/#/tasks?handler=legacy.export&created_after=${Date.now() + 3600000}`);
  await page.getByText('0 tasks').waitFor();
  await visit(page, `${base}/#/tasks?handler=invoice.line&root=true`);
  await page.getByText('0 tasks').waitFor();
  await visit(page, `${base}/#/tasks?handler=invoice.line`);
  await page.getByText('1 task', { exact: true }).waitFor();

  // The failed task: its traceback; a read token's retry is refused.
  await visit(page, `${base}/#/tasks?state=failed&handler=report.build`);
  await rows(page, '#tasks-table').first().getByRole('link').first().click();
  await page.waitForFunction((id) => location.hash === `#/task/${id}`, ids.report);
  await page.locator('pre.trace').first().waitFor();
  assert.match(await page.locator('pre.trace').first().textContent(), /KeyError: 'template'/);
  assert.match(await page.locator('.error-block').first().innerText(), /report template missing/);
  await shot(page, '3-task-failed');
  await page.getByRole('button', { name: 'Retry task' }).click();
  await status(page, /Refused: .*read scope/);
  assert.equal(await page.locator('#task-state').textContent(), 'failed');

  // The decision with its fan-out and convergence.
  await visit(page, `${base}/#/task/${ids.order}`);
  await page.locator('#step-graph').waitFor();
  const graphText = await page.locator('#step-graph').textContent();
  assert.match(graphText, /order\.pack#0…#5/, 'the fan-out range is one node');
  assert.match(graphText, /fan-out 6: 6 completed/);
  assert.match(graphText, /order\.ship/);
  assert.match(graphText, /converges/);
  assert.ok(await page.locator('#step-graph path.edge.decided').count() >= 1, 'edges of the decision');
  assert.ok(await page.locator('#step-graph path.edge:not(.decided)').count() >= 1, 'dependency edges');
  assert.equal(await page.locator('#timeline rect.span').count(), 8, 'the timeline has every step');
  await shot(page, '4-task-graph');

  // A step routed on its status: the status and where its routes lead.
  await visit(page, `${base}/#/task/${ids.routed}`);
  await page.locator('#step-check').waitFor();
  assert.match(await page.locator('#step-check summary').innerText(), /status out_of_stock/);
  assert.equal(await page.locator('#step-check .step-status').textContent(), 'out_of_stock');
  assert.equal(await page.locator('#step-check .step-routes').textContent(), 'ok → ship; out_of_stock → backorder');
  assert.equal(await page.locator('#step-backorder').count(), 1, 'the routed step was created');
  assert.equal(await page.locator('#step-ship').count(), 0, 'the other route was not taken');

  // The suspended parent: what it waits for, its checkpoint and child.
  await visit(page, `${base}/#/task/${ids.parent}`);
  await page.locator('.wait-event').first().waitFor();
  assert.equal(await page.locator('.wait-event').first().textContent(), 'paid.1');
  assert.equal(await rows(page, '#children-table').count(), 1);
  assert.match(await page.locator('#children-table').innerText(), /invoice\.line[\s\S]*completed/);
  const stepText = await page.locator('details.step').first().innerText();
  assert.match(stepText, /Checkpoints[\s\S]*lines/);
  assert.doesNotMatch(stepText, /\$/, 'internal checkpoints are hidden by default');
  await shot(page, '5-task-suspended');

  // The cancelled task: shown apart from failed.
  await visit(page, `${base}/#/task/${ids.cancelled}`);
  await page.getByText('Cancelled (not a failure).').waitFor();
  assert.equal(await page.locator('pre.trace').count(), 0);

  // Failures: groups; a read token's bulk retry is refused.
  await visit(page, `${base}/#/failures`);
  await rows(page, '#failures-table').first().waitFor();
  assert.equal(await rows(page, '#failures-table').count(), 2);
  const groupRow = rows(page, '#failures-table').filter({ hasText: 'card declined' });
  assert.match(await groupRow.innerText(), /payment\.charge\s+card declined\s+3/);
  assert.doesNotMatch(await page.locator('#failures-table').innerText(), /mail\.wait/, 'cancelled is not a failure');
  await shot(page, '6-failures');
  page.once('dialog', (d) => d.accept());
  await groupRow.getByRole('button').click();
  await status(page, /Refused/);
  assert.match(await groupRow.innerText(), /3/);

  // Hosts and handlers: the host, and a warning for the unserved handler.
  await visit(page, `${base}/#/hosts`);
  await page.locator('#hosts-table').waitFor();
  assert.match(await page.locator('#hosts-table').innerText(), /dashboard-seed\s+live\s+rust\s+\d+/);
  const legacy = rows(page, '#handlers-table').filter({ hasText: 'legacy.export' });
  assert.match(await legacy.innerText(), /Warning: no live host serves this handler\s+56/);
  const served = rows(page, '#handlers-table').filter({ hasText: 'payment.charge' });
  assert.match(await served.innerText(), /dashboard-seed/);
  await shot(page, '7-hosts');

  // Events: a read token cannot emit.
  await visit(page, `${base}/#/events`);
  await page.getByLabel('Event name').fill('dash.read');
  await page.getByRole('button', { name: 'Emit', exact: true }).click();
  await status(page, /Refused/);
  await shot(page, '8-events');

  // --- write token: act ----------------------------------------------------
  await signIn(page, base, WRITE);
  await visit(page, `${base}/#/task/${ids.report}`);
  await page.getByRole('button', { name: 'Retry task' }).click();
  await status(page, /Task retried/);
  await page.locator('#task-state').filter({ hasText: /^completed$/ }).waitFor({ timeout: 30000 });
  log('the retried task completed');

  await visit(page, `${base}/#/failures`);
  const group = rows(page, '#failures-table').filter({ hasText: 'card declined' });
  await group.waitFor();
  let asked = '';
  page.once('dialog', (d) => { asked = d.message(); d.accept(); });
  await group.getByRole('button').click();
  await status(page, /Retried 3 of 3 tasks/);
  assert.match(asked, /Retry all 3 failed tasks of payment\.charge/);
  await visit(page, `${base}/#/tasks?state=completed&handler=payment.charge`);
  for (let i = 0; ; i++) {
    await page.locator('#task-results caption').waitFor();
    if (/^3 tasks/.test(await page.locator('#task-results caption').textContent())) break;
    assert.ok(i < 60, 'the retried group completes');
    await page.waitForTimeout(500);
    await page.reload();
  }
  log('the retried group completed');
  await visit(page, `${base}/#/failures`);
  await page.getByText('No failed tasks.').waitFor();

  await visit(page, `${base}/#/task/${ids.parent}`);
  await page.getByRole('button', { name: 'Emit paid.1' }).waitFor();
  await page.getByLabel('Payload (JSON) for event paid.1').fill('{"amount": 42}');
  await page.getByRole('button', { name: 'Emit paid.1' }).click();
  await status(page, /Event paid\.1 emitted/);
  await page.locator('#task-state').filter({ hasText: /^completed$/ }).waitFor({ timeout: 30000 });
  assert.match(await page.locator('pre[aria-label="task result"]').textContent(), /"amount": 42/);
  log('the suspended task finished');

  // Cancel with cascade.
  await visit(page, `${base}/#/task/${ids.orphan}`);
  await page.getByLabel('Also cancel its unfinished descendants (cascade)').check();
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Cancel task' }).click();
  await status(page, /Task cancelled/);
  await page.locator('#task-state').filter({ hasText: /^cancelled$/ }).waitFor();

  // Events: the emitted one is listed; filter by name; emit one.
  await visit(page, `${base}/#/events`);
  await page.getByLabel('Event name').fill('dash.test');
  await page.getByLabel('Payload (JSON)').fill('{"hello": "world"}');
  await page.getByRole('button', { name: 'Emit', exact: true }).click();
  await status(page, /Event dash\.test emitted/);
  await page.getByLabel('Name starts with').fill('paid');
  await page.getByRole('button', { name: 'Filter' }).click();
  await page.getByText('1 recent event').waitFor();
  assert.match(await page.locator('#events-table').innerText(), /paid\.1[\s\S]*"amount": 42/);
  await visit(page, `${base}/#/events`);
  await page.getByText('2 recent events').waitFor();
  assert.match(await page.locator('#events-table').innerText(), /dash\.test/);

  await page.goto(`${base}/`);
  await page.locator('#state-counts').waitFor();
  await page.locator('#state-counts').filter({ hasText: /8\s+completed/ }).waitFor({ timeout: 10000 });
  await shot(page, '9-overview-after');

  assert.deepEqual(remote, [], 'no request leaves the server');
  assert.deepEqual(consoleErrors, [], 'no script errors');
  await context.close();
  await stop(server);
  await stop(seed.proc);
  log('browser checks passed');

  // --- first render of the tasks page over many tasks ---------------------
  if (BULK > 0) {
    const bulkUrl = `sqlite:${path.join(tmp, 'bulk.db')}`;
    const t0 = Date.now();
    const b = await start(SEED, ['--store', bulkUrl, '--bulk', String(BULK)], (l) => l.includes('"seeded"'), 600000);
    log(`seeded ${BULK} tasks in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    await new Promise((r) => (b.proc.exitCode !== null ? r() : b.proc.once('exit', r)));
    const big = await serve(bulkUrl);
    const ctx2 = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await ctx2.addInitScript((t) => sessionStorage.setItem('switchyard.token', t), READ);
    const p2 = await ctx2.newPage();
    const times = [];
    for (let i = 0; i < 3; i++) {
      const t = Date.now();
      await p2.goto(`${big.base}/#/tasks?r=${i}`);
      await p2.locator('#tasks-table tbody tr').first().waitFor({ timeout: 60000 });
      const wall = Date.now() - t;
      const nav = await p2.evaluate(() => Math.round(performance.now()));
      times.push({ wall, nav });
      await p2.goto('about:blank');
    }
    assert.equal(await (async () => { await p2.goto(`${big.base}/#/tasks`); await p2.locator('#tasks-table tbody tr').first().waitFor(); return p2.locator('#tasks-table tbody tr').count(); })(), 50);
    await shot(p2, '10-tasks-1m');
    console.log(`DASHBOARD FIRST RENDER: tasks page over ${BULK} tasks: ${times.map((x) => `${x.wall} ms`).join(', ')} (navigation to first row; first is a cold start) — target < 500 ms, not asserted`);
    await ctx2.close();
    await stop(big.proc);
  }
  log(`done in ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${SHOTS}`);
}

// A hung browser or server must not hang `make test`.
const watchdog = setTimeout(() => {
  console.error('dashboard test FAILED: still running after 5 minutes');
  process.exit(1);
}, 300000);
watchdog.unref();

try {
  await main();
} catch (e) {
  console.error('dashboard test FAILED:', e);
  if (lastPage) {
    await shot(lastPage, 'failure').catch(() => {});
    console.error(`page at failure: ${lastPage.url()} (screenshot ${SHOTS}/failure.png)`);
    console.error(await lastPage.locator('main').innerText().catch(() => ''));
  }
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
  cleanup();
}
