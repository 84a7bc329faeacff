// Task detail: the steps as a graph and a timeline, each step's input,
// result, error and traceback, checkpoints, wait and children; actions.
import { get, post } from './api.js';
import { fill, h, s, time, badge, json, taskLink, table, say, problem } from './ui.js';

const FINISHED = ['completed', 'failed', 'cancelled'];

/** Layers: the first step (the root, which decides) at 0; a step with
 * dependencies one after its deepest dependency; others (made by the root's
 * decision) at 1. Fan-out steps `name#i` of one handler share a node when
 * there are many. */
function layout(steps) {
  const byName = new Map(steps.map((st) => [st.name, st]));
  const layer = new Map();
  const depth = (st, seen = new Set()) => {
    if (layer.has(st.name)) return layer.get(st.name);
    if (seen.has(st.name)) return 1;
    seen.add(st.name);
    let d;
    if (st === steps[0]) d = 0;
    else if (!st.depends_on.length) d = 1;
    else d = 1 + Math.max(...st.depends_on.map((n) => (byName.has(n) ? depth(byName.get(n), seen) : 0)));
    layer.set(st.name, d);
    return d;
  };
  steps.forEach((st) => depth(st));
  // Group fan-out ranges: `base#i` in the same layer, more than 4 of them.
  const nodes = [];
  const groupOf = new Map();
  const ranges = new Map();
  for (const st of steps) {
    const m = st.name.match(/^(.*)#(\d+)$/);
    if (m) {
      const key = `${layer.get(st.name)}|${m[1]}`;
      if (!ranges.has(key)) ranges.set(key, []);
      ranges.get(key).push(st);
    }
  }
  for (const st of steps) {
    const m = st.name.match(/^(.*)#(\d+)$/);
    const key = m ? `${layer.get(st.name)}|${m[1]}` : null;
    if (key && ranges.get(key).length > 4) {
      if (!groupOf.has(key)) {
        const members = ranges.get(key);
        const node = { id: key, label: `${m[1]}#0…#${members.length - 1}`, layer: layer.get(st.name), members, fanout: true };
        nodes.push(node);
        groupOf.set(key, node);
      }
      groupOf.set(st.name, groupOf.get(key));
    } else {
      const node = { id: st.name, label: st.name, layer: layer.get(st.name), members: [st], fanout: false };
      nodes.push(node);
      groupOf.set(st.name, node);
    }
  }
  const edges = new Set();
  const list = [];
  for (const st of steps) {
    const to = groupOf.get(st.name);
    const froms = st.depends_on.length ? st.depends_on : (st === steps[0] ? [] : [steps[0].name]);
    for (const f of froms) {
      const from = groupOf.get(f);
      if (!from || from === to) continue;
      const k = `${from.id}->${to.id}`;
      if (!edges.has(k)) { edges.add(k); list.push({ from, to, decided: !st.depends_on.length }); }
    }
  }
  return { nodes, edges: list };
}

function summary(members) {
  const c = {};
  for (const m of members) c[m.state] = (c[m.state] || 0) + 1;
  return Object.entries(c).map(([k, n]) => `${n} ${k}`).join(', ');
}

function graph(steps) {
  const { nodes, edges } = layout(steps);
  const layers = [];
  for (const n of nodes) (layers[n.layer] ||= []).push(n);
  const NW = 170, NH = 46, GX = 60, GY = 18;
  let height = 0;
  layers.forEach((col, i) => {
    (col || []).forEach((n, j) => { n.x = 10 + i * (NW + GX); n.y = 10 + j * (NH + GY); });
    height = Math.max(height, 10 + (col || []).length * (NH + GY));
  });
  const width = 20 + layers.length * (NW + GX);
  const svg = s('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', 'aria-labelledby': 'graph-title', class: 'graph', id: 'step-graph' },
    s('title', { id: 'graph-title' }, `Step graph: ${steps.length} steps`),
    s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto' }, s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }))));
  for (const e of edges) {
    svg.append(s('path', {
      d: `M${e.from.x + NW},${e.from.y + NH / 2} C${e.from.x + NW + GX / 2},${e.from.y + NH / 2} ${e.to.x - GX / 2},${e.to.y + NH / 2} ${e.to.x},${e.to.y + NH / 2}`,
      class: e.decided ? 'edge decided' : 'edge', 'marker-end': 'url(#arrow)',
    }, s('title', {}, e.decided ? `${e.from.label} decided ${e.to.label}` : `${e.to.label} depends on ${e.from.label}`)));
  }
  for (const n of nodes) {
    const state = n.members.length === 1 ? n.members[0].state : (n.members.some((m) => m.state === 'failed') ? 'failed' : n.members.every((m) => m.state === 'completed') ? 'completed' : 'running');
    const sub = n.fanout ? `fan-out ${n.members.length}: ${summary(n.members)}` : `${state}${n.members[0].depends_on.length > 1 ? ' · converges' : ''}`;
    const g = s('g', { class: `node state-${state}` },
      s('title', {}, `${n.label} (${n.members[0].handler}): ${sub}`),
      s('rect', { x: n.x, y: n.y, width: NW, height: NH, rx: 6 }),
      s('text', { x: n.x + 8, y: n.y + 18, class: 'node-name' }, n.label.length > 24 ? `${n.label.slice(0, 23)}…` : n.label),
      s('text', { x: n.x + 8, y: n.y + 36, class: 'node-state' }, sub.length > 28 ? `${sub.slice(0, 27)}…` : sub));
    const a = s('a', { href: `#step-${encodeURIComponent(n.members[0].name)}` }, g);
    svg.append(a);
  }
  return h('div', { class: 'graph-wrap' }, svg);
}

function timeline(detail) {
  const steps = detail.steps;
  const t0 = Math.min(detail.task.created_at, ...steps.map((x) => x.created_at));
  const end = Math.max(detail.task.updated_at, ...steps.map((x) => x.updated_at), ...detail.checkpoints.map((c) => c.created_at));
  const span = Math.max(1, end - t0);
  const W = 700, L = 170, RH = 22;
  const x = (t) => L + ((t - t0) / span) * (W - L - 10);
  const svg = s('svg', { viewBox: `0 0 ${W} ${steps.length * RH + 24}`, role: 'img', 'aria-labelledby': 'tl-title', class: 'timeline', id: 'timeline' },
    s('title', { id: 'tl-title' }, `Timeline of ${steps.length} steps over ${span} ms`));
  steps.forEach((st, i) => {
    const y = 4 + i * RH;
    const label = `${st.name.length > 16 ? `${st.name.slice(0, 15)}…` : st.name} r${st.run}/a${st.attempt}`;
    svg.append(s('text', { x: 0, y: y + 13, class: 'tick' }, label));
    svg.append(s('rect', { x: x(st.created_at), y: y + 3, width: Math.max(2, x(st.updated_at) - x(st.created_at)), height: 12, class: `span state-${st.state}` },
      s('title', {}, `${st.name}: ${st.state}, run ${st.run}, attempt ${st.attempt}, ${time(st.created_at)} → ${time(st.updated_at)}`)));
    for (const c of detail.checkpoints.filter((c) => c.step_id === st.id)) {
      svg.append(s('circle', { cx: x(c.created_at), cy: y + 9, r: 3, class: 'cp' }, s('title', {}, `checkpoint ${c.key} by run ${c.run} at ${time(c.created_at)}`)));
    }
  });
  svg.append(s('text', { x: L, y: steps.length * RH + 20, class: 'tick' }, time(t0)));
  svg.append(s('text', { x: W - 120, y: steps.length * RH + 20, class: 'tick' }, `+${span} ms`));
  return h('figure', {}, svg, h('figcaption', {}, 'Each row is a step with its runs (r) and attempts (a) so far; bars run from its creation to its last change; dots are checkpoints (hover for the run that wrote each).'));
}

function errorBlock(err, what) {
  if (!err) return null;
  return h('div', { class: 'error-block' },
    h('p', {}, h('strong', {}, `${what} error (${err.kind}, attempt ${err.attempt}): `), err.message),
    err.trace ? h('details', { open: true }, h('summary', {}, 'Traceback'), h('pre', { class: 'trace' }, err.trace)) : null);
}

function waitText(w) {
  if (!w) return null;
  const parts = [];
  if (w.event) parts.push(h('span', {}, 'event ', h('code', { class: 'wait-event' }, w.event)));
  if (w.wake_at) parts.push(`wake at ${time(w.wake_at)}`);
  if (w.group) parts.push(h('span', {}, 'children of group ', h('code', {}, w.group)));
  return h('p', { class: 'wait' }, h('strong', {}, 'Waits for: '), ...parts.flatMap((p, i) => (i ? [' or ', p] : [p])));
}

function render(ctx, detail, opts) {
  const t = detail.task;
  const actions = h('section', { 'aria-labelledby': 'h-actions', class: 'actions' }, h('h2', { id: 'h-actions' }, 'Actions'));
  const act = async (label, fn) => {
    try {
      await fn();
      say(label, 'ok');
    } catch (e) {
      say(e.status === 403 ? `Refused: ${e.message}` : e.message, 'error');
    }
    await opts.reload();
  };
  if (t.state === 'running') {
    const cascade = h('input', { type: 'checkbox', id: 'cascade' });
    actions.append(h('div', { class: 'field check' }, cascade, h('label', { for: 'cascade' }, 'Also cancel its unfinished descendants (cascade)')),
      h('button', { type: 'button', id: 'cancel', onclick: () => {
        if (!window.confirm(`Cancel task ${t.id}${cascade.checked ? ' and its descendants' : ''}?`)) return;
        act('Task cancelled.', () => post(`/tasks/${t.id}/cancel${cascade.checked ? '?cascade=true' : ''}`));
      } }, 'Cancel task'));
  }
  if (t.state === 'failed' || t.state === 'cancelled') {
    actions.append(h('button', { type: 'button', id: 'retry', onclick: () => act('Task retried.', () => post(`/tasks/${t.id}/retry`)) }, 'Retry task'));
  }
  for (const st of detail.steps) {
    if (st.state === 'suspended' && st.wait && st.wait.event) {
      const payload = h('input', { id: `emit-${st.id}`, value: 'null', autocomplete: 'off' });
      actions.append(h('div', { class: 'field' },
        h('label', { for: `emit-${st.id}` }, `Payload (JSON) for event ${st.wait.event}`), payload,
        h('button', { type: 'button', class: 'emit-awaited', onclick: () => {
          let v;
          try { v = JSON.parse(payload.value || 'null'); } catch (e) { say(`The payload is not JSON: ${e.message}`, 'error'); return; }
          act(`Event ${st.wait.event} emitted.`, () => post('/events', { name: st.wait.event, payload: v }));
        } }, `Emit ${st.wait.event}`)));
    }
  }
  if (actions.children.length === 1) actions.append(h('p', {}, 'Nothing to do: the task completed.'));

  const internal = h('input', { type: 'checkbox', id: 'internal', checked: opts.internal, onchange: (e) => { opts.internal = e.target.checked; render(ctx, detail, opts); } });
  const cps = (st) => detail.checkpoints.filter((c) => c.step_id === st.id && (opts.internal || !c.key.startsWith('$')));
  const kids = (st) => detail.children.filter((c) => c.parent && c.parent.step_id === st.id);
  const steps = detail.steps.map((st) => h('details', { id: `step-${st.name}`, class: 'step', open: opts.open.has(st.name) || st.state === 'failed' || st.state === 'suspended', ontoggle: (e) => { if (e.target.open) opts.open.add(st.name); else opts.open.delete(st.name); } },
    h('summary', {}, h('strong', {}, st.name), ' ', badge(st.state), ` ${st.handler} · run ${st.run} · attempt ${st.attempt}`, st.status ? ` · status ${st.status}` : ''),
    h('dl', {},
      st.status ? [h('dt', {}, 'Status'), h('dd', { class: 'step-status' }, st.status)] : null,
      st.routes && Object.keys(st.routes).length ? [h('dt', {}, 'Routes'), h('dd', { class: 'step-routes' }, Object.entries(st.routes).map(([status, routed]) => `${status} → ${routed.length ? routed.map((r) => r.name).join(', ') : '(nothing)'}`).join('; '))] : null,
      h('dt', {}, 'Depends on'), h('dd', {}, st.depends_on.length ? st.depends_on.join(', ') : (st === detail.steps[0] ? '(root step)' : '(decided by the root step)')),
      h('dt', {}, 'Created'), h('dd', {}, time(st.created_at)),
      h('dt', {}, 'Last change'), h('dd', {}, time(st.updated_at)),
      st.lease_owner ? [h('dt', {}, 'Leased by'), h('dd', {}, st.lease_owner)] : null),
    waitText(st.wait),
    h('h3', {}, 'Input'), json(st.input, `input of ${st.name}`),
    st.result !== null && st.result !== undefined ? [h('h3', {}, 'Result'), json(st.result, `result of ${st.name}`)] : null,
    errorBlock(st.error, 'Step'),
    cps(st).length ? [h('h3', {}, 'Checkpoints'), table(null, ['Key', 'Run', 'Written', 'Value'], cps(st).map((c) => [c.key, String(c.run), time(c.created_at), json(c.value, `checkpoint ${c.key}`)]))] : null,
    kids(st).length ? [h('h3', {}, 'Children'), table(null, ['Task', 'Handler', 'State', 'Group'], kids(st).map((c) => [taskLink(c.id), c.handler, badge(c.state), c.parent.group || '']))] : null));

  document.title = `Task ${t.id.slice(0, 8)} · Switchyard`;
  fill(ctx.main, 
    h('h1', {}, 'Task ', h('span', { class: 'mono' }, t.id), ' ', badge(t.state)),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Handler'), h('dd', {}, t.handler),
      h('dt', {}, 'State'), h('dd', { id: 'task-state' }, t.state),
      h('dt', {}, 'Created'), h('dd', {}, time(t.created_at)),
      h('dt', {}, 'Last change'), h('dd', {}, time(t.updated_at)),
      t.idempotency_key ? [h('dt', {}, 'Idempotency key'), h('dd', {}, t.idempotency_key)] : null,
      t.parent ? [h('dt', {}, 'Parent'), h('dd', {}, taskLink(t.parent.task_id))] : null,
      h('dt', {}, 'Priority'), h('dd', {}, String(t.priority))),
    t.state === 'cancelled' ? h('p', { class: 'note' }, 'Cancelled (not a failure).') : null,
    errorBlock(t.state === 'failed' ? t.error : null, 'Task'),
    t.result !== null && t.result !== undefined ? [h('h2', {}, 'Result'), json(t.result, 'task result')] : null,
    actions,
    h('section', { 'aria-labelledby': 'h-graph' }, h('h2', { id: 'h-graph' }, 'Steps graph'), graph(detail.steps),
      h('p', { class: 'help' }, 'Solid arrows: dependencies (a step with several converges them); dashed: steps made by the root step\'s decision. Fan-out ranges of more than four steps are one node.')),
    h('section', { 'aria-labelledby': 'h-tl' }, h('h2', { id: 'h-tl' }, 'Timeline'), timeline(detail)),
    h('section', { 'aria-labelledby': 'h-steps' }, h('h2', { id: 'h-steps' }, 'Steps'),
      h('div', { class: 'field check' }, internal, h('label', { for: 'internal' }, 'Show internal checkpoints')),
      ...steps),
    h('section', { 'aria-labelledby': 'h-children' }, h('h2', { id: 'h-children' }, `Children (${detail.children.length})`),
      detail.children.length ? table(null, ['Task', 'Handler', 'State', 'Created'], detail.children.map((c) => [taskLink(c.id), c.handler, badge(c.state), time(c.created_at)]), { id: 'children-table' }) : h('p', {}, 'None.')));
}

export async function taskDetail(ctx, id) {
  const opts = { internal: false, open: new Set() };
  let shown = '';
  const load = async () => {
    let d;
    try { d = await get(`/tasks/${id}`); } catch (e) { fill(ctx.main, h('h1', {}, 'Task'), problem(e)); return; }
    const key = JSON.stringify([d.task.state, d.task.updated_at, d.steps.map((x) => [x.state, x.updated_at]), d.children.map((c) => c.state), d.checkpoints.length]);
    if (key !== shown) {
      const focused = document.activeElement && document.activeElement.id;
      shown = key;
      render(ctx, d, opts);
      if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
    }
  };
  opts.reload = load;
  await load();
  ctx.every(1500, load);
}
