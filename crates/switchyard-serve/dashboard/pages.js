// Overview, Tasks, Failures, Hosts and handlers, Events.
import { get, post, qs } from './api.js';
import { fill, h, s, time, age, badge, json, taskLink, table, say, problem } from './ui.js';

const TASK_STATES = ['running', 'completed', 'failed', 'cancelled'];

// --- Overview ---------------------------------------------------------------

function chart(stats) {
  const n = Math.round((stats.now - stats.since) / stats.bucket_ms);
  const buckets = Array.from({ length: n }, (_, i) => ({ start: stats.since + i * stats.bucket_ms, completed: 0, failed: 0, cancelled: 0 }));
  for (const b of stats.finished) {
    const i = Math.floor((b.start - stats.since) / stats.bucket_ms);
    if (buckets[i]) buckets[i][b.state] = b.count;
  }
  const max = Math.max(1, ...buckets.map((b) => Math.max(b.completed, b.failed)));
  const W = 720, H = 180, pad = 30, bw = (W - pad) / Math.max(1, n);
  const bars = [];
  buckets.forEach((b, i) => {
    const x = pad + i * bw;
    const hc = ((H - 20) * b.completed) / max;
    const hf = ((H - 20) * b.failed) / max;
    const title = `${time(b.start)}: ${b.completed} completed, ${b.failed} failed, ${b.cancelled} cancelled`;
    bars.push(s('rect', { x: x + 0.5, y: H - hc, width: Math.max(1, bw / 2 - 1), height: hc, class: 'bar-completed' }, s('title', {}, title)));
    bars.push(s('rect', { x: x + bw / 2, y: H - hf, width: Math.max(1, bw / 2 - 1), height: hf, class: 'bar-failed' }, s('title', {}, title)));
  });
  const total = (k) => buckets.reduce((a, b) => a + b[k], 0);
  const svg = s('svg', { viewBox: `0 0 ${W} ${H + 20}`, role: 'img', 'aria-labelledby': 'chart-title chart-desc', class: 'chart' },
    s('title', { id: 'chart-title' }, 'Tasks completed and failed per minute, last hour'),
    s('defs', {}, s('pattern', { id: 'hatch', patternUnits: 'userSpaceOnUse', width: 4, height: 4 }, s('path', { d: 'M-1,1 l2,-2 M0,4 l4,-4 M3,5 l2,-2', class: 'hatch' }))),
    s('desc', { id: 'chart-desc' }, `${total('completed')} completed, ${total('failed')} failed, ${total('cancelled')} cancelled in the last hour; peak ${max} per minute.`),
    s('line', { x1: pad, y1: H, x2: W, y2: H, class: 'axis' }),
    s('text', { x: 0, y: 20, class: 'tick' }, String(max)),
    s('text', { x: 0, y: H, class: 'tick' }, '0'),
    s('text', { x: pad, y: H + 16, class: 'tick' }, '−60 min'),
    s('text', { x: W - 40, y: H + 16, class: 'tick' }, 'now'),
    ...bars);
  return h('figure', {},
    svg,
    h('figcaption', {},
      h('span', { class: 'key key-completed' }, '▮ completed (solid)'), ' ',
      h('span', { class: 'key key-failed' }, '▨ failed (hatched)'), ' ',
      `— last hour: ${total('completed')} completed, ${total('failed')} failed, ${total('cancelled')} cancelled (cancelled are not failures)`));
}

export async function overview(ctx) {
  document.title = 'Overview · Switchyard';
  const body = h('div', { id: 'overview-body' });
  fill(ctx.main, h('h1', {}, 'Overview'), h('p', { class: 'help' }, 'Updates every 5 seconds.'), body);
  const load = async () => {
    const [stats, handlers, hostList] = await Promise.all([get('/stats'), get('/handlers'), get('/hosts?ended_within=0s')]);
    const byState = Object.fromEntries(TASK_STATES.map((k) => [k, 0]));
    const byHandler = new Map();
    for (const c of stats.tasks) {
      byState[c.state] = (byState[c.state] || 0) + c.count;
      if (!byHandler.has(c.handler)) byHandler.set(c.handler, {});
      byHandler.get(c.handler)[c.state] = c.count;
    }
    const suspendedSteps = handlers.handlers.reduce((a, x) => a + x.suspended, 0);
    let oldest = null;
    for (const x of handlers.handlers) {
      if (x.oldest_ready_age_ms !== null && x.oldest_ready_age_ms !== undefined && (!oldest || x.oldest_ready_age_ms > oldest.age)) oldest = { age: x.oldest_ready_age_ms, handler: x.name };
    }
    const langs = new Map();
    for (const host of hostList.hosts) langs.set(host.language || 'unknown', (langs.get(host.language || 'unknown') || 0) + 1);
    fill(body,
      h('section', { 'aria-labelledby': 'h-counts' },
        h('h2', { id: 'h-counts' }, 'Tasks by state'),
        h('ul', { class: 'cards', id: 'state-counts' },
          TASK_STATES.map((k) => h('li', { class: `card state-${k}` }, h('a', { href: `#/tasks?state=${k}` }, h('span', { class: 'count' }, String(byState[k])), ' ', k))),
          h('li', { class: 'card state-suspended' }, h('a', { href: '#/tasks?state=suspended' }, h('span', { class: 'count' }, String(suspendedSteps)), ' steps suspended (waiting)')))),
      h('section', { 'aria-labelledby': 'h-chart' }, h('h2', { id: 'h-chart' }, 'Throughput'), chart(stats)),
      h('section', { 'aria-labelledby': 'h-ready' }, h('h2', { id: 'h-ready' }, 'Oldest ready step'),
        h('p', { id: 'oldest-ready' }, oldest ? [`due for ${age(oldest.age)}, handler `, h('strong', {}, oldest.handler)] : 'No step is waiting to run.')),
      h('section', { 'aria-labelledby': 'h-langs' }, h('h2', { id: 'h-langs' }, 'Live hosts by language'),
        langs.size ? table(null, ['Language', 'Live hosts'], [...langs].map(([l, n]) => [l, String(n)]), { id: 'hosts-by-language' }) : h('p', {}, 'No live host.')),
      h('section', { 'aria-labelledby': 'h-handlers' }, h('h2', { id: 'h-handlers' }, 'Tasks by handler'),
        table(null, ['Handler', ...TASK_STATES], [...byHandler].map(([name, c]) => [
          h('a', { href: `#/tasks?handler=${encodeURIComponent(name)}` }, name),
          ...TASK_STATES.map((k) => (c[k] ? h('a', { href: `#/tasks?handler=${encodeURIComponent(name)}&state=${k}` }, String(c[k])) : '0')),
        ]), { id: 'tasks-by-handler' })));
  };
  try { await load(); } catch (e) { fill(body, problem(e)); throw e; }
  ctx.every(5000, load);
}

// --- Tasks ------------------------------------------------------------------

const FILTERS = ['state', 'handler', 'created_after', 'created_before', 'root', 'q', 'cursor'];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function toLocalInput(ms) {
  if (!ms) return '';
  const d = new Date(Number(ms));
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export async function tasks(ctx) {
  document.title = 'Tasks · Switchyard';
  const p = Object.fromEntries(FILTERS.map((k) => [k, ctx.params.get(k) || '']));
  const field = (id, label, control) => h('div', { class: 'field' }, h('label', { for: id }, label), control);
  const state = h('select', { id: 'f-state', name: 'state' },
    h('option', { value: '' }, 'any'),
    ['running', 'suspended', 'completed', 'failed', 'cancelled'].map((k) => h('option', { value: k, selected: p.state === k }, k === 'suspended' ? 'suspended (waiting)' : k)));
  const handler = h('input', { id: 'f-handler', name: 'handler', value: p.handler, list: 'handler-names', autocomplete: 'off' });
  const after = h('input', { id: 'f-after', name: 'created_after', type: 'datetime-local', value: toLocalInput(p.created_after) });
  const before = h('input', { id: 'f-before', name: 'created_before', type: 'datetime-local', value: toLocalInput(p.created_before) });
  const root = h('input', { id: 'f-root', name: 'root', type: 'checkbox', checked: p.root === 'true' });
  const q = h('input', { id: 'f-q', name: 'q', value: p.q, autocomplete: 'off' });
  const names = h('datalist', { id: 'handler-names' });
  const form = h('form', { class: 'filters', 'aria-label': 'Filters', onsubmit: (e) => {
    e.preventDefault();
    const ms = (v) => (v ? String(new Date(v).getTime()) : '');
    window.location.hash = `#/tasks${qs({ state: state.value, handler: handler.value.trim(), created_after: ms(after.value), created_before: ms(before.value), root: root.checked ? 'true' : '', q: q.value.trim() })}`;
  } },
  field('f-state', 'State', state),
  field('f-handler', 'Handler', handler),
  field('f-after', 'Created from', after),
  field('f-before', 'Created before', before),
  h('div', { class: 'field check' }, root, h('label', { for: 'f-root' }, 'Root tasks only')),
  field('f-q', 'Task id or idempotency key', q),
  names,
  h('div', { class: 'field' }, h('button', { type: 'submit' }, 'Apply'), ' ', h('a', { href: '#/tasks' }, 'Clear')));
  const results = h('div', { id: 'task-results', 'aria-live': 'polite' }, h('p', {}, 'Loading…'));
  fill(ctx.main, h('h1', {}, 'Tasks'), form, results);
  get('/handlers').then((r) => fill(names, ...r.handlers.map((x) => h('option', { value: x.name })))).catch(() => {});

  let rows;
  let next = null;
  try {
    if (p.q && UUID.test(p.q)) {
      try {
        rows = [(await get(`/tasks/${p.q}`)).task];
      } catch (e) {
        if (e.status !== 404) throw e;
        rows = [];
      }
    } else {
      const page = await get(`/tasks${qs({
        limit: 50,
        state: p.state,
        handler: p.handler,
        created_after: p.created_after,
        created_before: p.created_before,
        root: p.root === 'true' ? 'true' : '',
        idempotency_key: p.q,
        cursor: p.cursor,
      })}`);
      rows = page.tasks;
      next = page.next_cursor;
    }
  } catch (e) {
    fill(results, problem(e));
    return;
  }
  const here = Object.fromEntries(FILTERS.filter((k) => k !== 'cursor').map((k) => [k, p[k]]));
  fill(results,
    table(`${rows.length} task${rows.length === 1 ? '' : 's'}${p.cursor ? ' (a later page)' : ''}`,
      ['Task', 'Handler', 'State', 'Created', 'Updated', 'Parent', 'Key'],
      rows.map((t) => [
        taskLink(t.id, t.id.slice(0, 8) + '…' + t.id.slice(-4)),
        t.handler,
        badge(t.state),
        time(t.created_at),
        time(t.updated_at),
        t.parent ? taskLink(t.parent.task_id, t.parent.task_id.slice(0, 8) + '…') : '',
        t.idempotency_key || '',
      ]), { id: 'tasks-table' }),
    h('nav', { 'aria-label': 'Pages of tasks', class: 'pager' },
      p.cursor ? h('a', { href: `#/tasks${qs(here)}` }, 'First page') : null, ' ',
      next ? h('a', { href: `#/tasks${qs({ ...here, cursor: next })}`, id: 'next-page' }, 'Next page') : null));
}

// --- Failures -------------------------------------------------------------

export async function failures(ctx) {
  document.title = 'Failures · Switchyard';
  const list = h('div', { id: 'failure-groups' });
  fill(ctx.main, h('h1', {}, 'Failures'),
    h('p', { class: 'help' }, 'Failed tasks grouped by handler and error message. Cancelled tasks are not failures and are not listed here.'),
    list);
  const load = async () => {
    let r;
    try { r = await get('/failures'); } catch (e) { fill(list, problem(e)); return; }
    if (!r.groups.length) {
      fill(list, h('p', {}, 'No failed tasks.'));
      return;
    }
    fill(list, table(null, ['Handler', 'Error message', 'Failed tasks', 'Last failure', 'Action'],
      r.groups.map((g) => [
        h('a', { href: `#/tasks${qs({ state: 'failed', handler: g.handler })}` }, g.handler),
        h('span', { class: 'message' }, g.message || '(no message)'),
        String(g.count),
        time(g.last_failed_at),
        h('button', { type: 'button', class: 'retry-group', 'aria-label': `Retry all ${g.count} failed ${g.handler} tasks with “${g.message}”`, onclick: async () => {
          if (!window.confirm(`Retry all ${g.count} failed tasks of ${g.handler} with the error “${g.message}”?`)) return;
          try {
            const res = await post('/tasks/retry', { handler: g.handler, message: g.message, max: 1000 });
            say(`Retried ${res.retried} of ${res.matched} tasks${res.skipped.length ? `; ${res.skipped.length} skipped` : ''}.`, 'ok');
          } catch (e) {
            say(e.status === 403 ? `Refused: ${e.message}` : e.message, 'error');
          }
          await load();
        } }, 'Retry all in this group'),
      ]), { id: 'failures-table' }));
  };
  await load();
}

// --- Hosts and handlers -------------------------------------------------------

export async function hosts(ctx) {
  document.title = 'Hosts and handlers · Switchyard';
  const body = h('div', {});
  fill(ctx.main, h('h1', {}, 'Hosts and handlers'), body);
  const load = async () => {
    const [hl, hd] = await Promise.all([get('/hosts'), get('/handlers')]);
    const hostName = new Map([...hl.hosts].map((x) => [x.id, `${x.name || x.hostname} (pid ${x.pid})`]));
    const hostRows = (list) => list.map((x) => [
      h('span', { class: 'mono', title: x.id }, x.name || x.id.slice(0, 8)),
      x.state,
      x.language || 'unknown',
      String(x.pid),
      x.hostname,
      x.slots === null || x.slots === undefined ? '' : String(x.slots),
      String(x.steps_in_flight),
      `${time(x.last_heartbeat)} (${age(x.heartbeat_age_ms)} ago)`,
      x.handlers.join(', '),
    ]);
    const cols = ['Host', 'State', 'Language', 'PID', 'Machine', 'Slots', 'In flight', 'Last heartbeat', 'Handlers'];
    fill(body,
      h('section', { 'aria-labelledby': 'h-hosts' }, h('h2', { id: 'h-hosts' }, 'Live hosts'),
        hl.hosts.length ? table(null, cols, hostRows(hl.hosts), { id: 'hosts-table' }) : h('p', {}, 'No live host.')),
      hl.ended.length ? h('section', { 'aria-labelledby': 'h-ended' }, h('h2', { id: 'h-ended' }, 'Ended in the last hour'), table(null, cols, hostRows(hl.ended))) : null,
      h('section', { 'aria-labelledby': 'h-hd' }, h('h2', { id: 'h-hd' }, 'Handlers'),
        table(null, ['Handler', 'Served by', 'Ready (queue)', 'Running', 'Suspended', 'Failed', 'Oldest ready'],
          hd.handlers.map((x) => [
            x.name,
            x.hosts.length ? x.hosts.map((id) => hostName.get(id) || id).join(', ')
              : h('strong', { class: 'warning' }, '⚠ Warning: no live host serves this handler'),
            String(x.ready), String(x.running), String(x.suspended), String(x.failed),
            x.oldest_ready_age_ms === null || x.oldest_ready_age_ms === undefined ? '' : age(x.oldest_ready_age_ms),
          ]), { id: 'handlers-table' })));
  };
  try { await load(); } catch (e) { fill(body, problem(e)); throw e; }
  ctx.every(5000, load);
}

// --- Events -----------------------------------------------------------------

export async function events(ctx) {
  document.title = 'Events · Switchyard';
  const prefix = ctx.params.get('prefix') || '';
  const filter = h('input', { id: 'e-prefix', name: 'prefix', value: prefix, autocomplete: 'off' });
  const name = h('input', { id: 'e-name', name: 'name', required: true, autocomplete: 'off', value: ctx.params.get('emit') || '' });
  const payload = h('textarea', { id: 'e-payload', name: 'payload', rows: 3 }, 'null');
  const list = h('div', { id: 'event-list' });
  fill(ctx.main, h('h1', {}, 'Events'),
    h('form', { class: 'filters', 'aria-label': 'Filter events', onsubmit: (e) => {
      e.preventDefault();
      window.location.hash = `#/events${qs({ prefix: filter.value.trim() })}`;
    } },
    h('div', { class: 'field' }, h('label', { for: 'e-prefix' }, 'Name starts with'), filter),
    h('div', { class: 'field' }, h('button', { type: 'submit' }, 'Filter'))),
    list,
    h('section', { 'aria-labelledby': 'h-emit' },
      h('h2', { id: 'h-emit' }, 'Emit an event'),
      h('form', { class: 'emit', onsubmit: async (e) => {
        e.preventDefault();
        let value;
        try { value = JSON.parse(payload.value || 'null'); } catch (err) { say(`The payload is not JSON: ${err.message}`, 'error'); return; }
        try {
          const r = await post('/events', { name: name.value.trim(), payload: value });
          say(r.stored ? `Event ${name.value.trim()} emitted.` : `Event ${name.value.trim()} was already emitted (first write wins).`, 'ok');
          await load();
        } catch (err) {
          say(err.status === 403 ? `Refused: ${err.message}` : err.message, 'error');
        }
      } },
      h('div', { class: 'field' }, h('label', { for: 'e-name' }, 'Event name'), name),
      h('div', { class: 'field' }, h('label', { for: 'e-payload' }, 'Payload (JSON)'), payload),
      h('button', { type: 'submit' }, 'Emit'))));
  const load = async () => {
    try {
      const r = await get(`/events${qs({ prefix, limit: 100 })}`);
      fill(list, r.events.length
        ? table(`${r.events.length} recent event${r.events.length === 1 ? '' : 's'}`, ['Name', 'Emitted', 'Payload'], r.events.map((ev) => [ev.name, time(ev.created_at), json(ev.payload, `payload of ${ev.name}`)]), { id: 'events-table' })
        : h('p', {}, 'No events.'));
    } catch (e) { fill(list, problem(e)); }
  };
  await load();
}
