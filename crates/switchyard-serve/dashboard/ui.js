// DOM helpers shared by the pages. Everything is built with the DOM API
// (no innerHTML with data), so names and payloads are never markup.

/** h('a', {href: '#/'}, 'text', child, ...): an element. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

/** Replaces an element's children (arrays flattened, null and false left out). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const SVG = 'http://www.w3.org/2000/svg';

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A time (ms since the epoch) as local date and time. */
export function time(ms) {
  if (ms === undefined || ms === null) return '';
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A duration in ms, short. */
export function age(ms) {
  if (ms === undefined || ms === null) return '';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3600000) return `${Math.floor(ms / 60000)} min ${Math.floor((ms % 60000) / 1000)} s`;
  return `${Math.floor(ms / 3600000)} h ${Math.floor((ms % 3600000) / 60000)} min`;
}

/** A state as a labelled badge: the word is always shown (not colour alone). */
export function badge(state) {
  return h('span', { class: `badge state-${state}` }, state);
}

/** JSON, pretty, in a <pre>. */
export function json(v, label) {
  return h('pre', { class: 'json', 'aria-label': label }, v === undefined ? '' : JSON.stringify(v, null, 2));
}

/** A short task id for tables (the full one is in the link's title). */
export function taskLink(id, text) {
  return h('a', { href: `#/task/${id}`, title: id, class: 'mono' }, text || id);
}

/** A table: headers, then rows of cells. */
export function table(caption, headers, rows, attrs) {
  return h('table', attrs || {},
    caption ? h('caption', {}, caption) : null,
    h('thead', {}, h('tr', {}, headers.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c))))));
}

/** Shows a message in the page's live region. */
export function say(text, kind) {
  const el = document.getElementById('status');
  el.className = kind || '';
  el.textContent = text;
}

/** An error box (role=alert). */
export function problem(e) {
  return h('p', { class: 'error', role: 'alert' }, e.status === 403 ? `Refused: ${e.message}` : String(e.message || e));
}
