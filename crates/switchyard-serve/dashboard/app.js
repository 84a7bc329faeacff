// The dashboard's shell: the token form, the hash router, live updates.
import { token, setToken, forgetToken, get } from './api.js';
import { fill, h, say } from './ui.js';
import { overview, tasks, failures, hosts, events } from './pages.js';
import { taskDetail } from './task.js';

const main = document.getElementById('main');
let current = { stop: () => {} };

const ROUTES = [
  [/^\/?$/, 'overview', overview],
  [/^\/tasks$/, 'tasks', tasks],
  [/^\/task\/([0-9a-fA-F-]+)$/, 'tasks', taskDetail],
  [/^\/failures$/, 'failures', failures],
  [/^\/hosts$/, 'hosts', hosts],
  [/^\/events$/, 'events', events],
];

/** The hash as a path and its query parameters. */
export function location() {
  const raw = window.location.hash.replace(/^#/, '') || '/';
  const [path, query] = raw.split('?');
  return { path, params: new URLSearchParams(query || '') };
}

function tokenForm(message) {
  current.stop();
  current = { stop: () => {} };
  document.title = 'Token · Switchyard';
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', 'aria-describedby': 'token-help' });
  const form = h('form', { class: 'token-form', onsubmit: async (e) => {
    e.preventDefault();
    setToken(input.value.trim());
    try {
      await get('/handlers');
      say('Token accepted.');
      route();
    } catch (err) {
      forgetToken();
      tokenForm(err.status === 401 ? `That token was refused: ${err.message}` : err.message);
    }
  } },
  h('h1', {}, 'API token'),
  message ? h('p', { class: 'error', role: 'alert' }, message) : null,
  h('label', { for: 'token' }, 'Bearer token'),
  input,
  h('p', { id: 'token-help', class: 'help' },
    'A read token can look; a write token can also cancel, retry and emit. It is kept for this tab only. Leave it empty if the server has no tokens.'),
  h('button', { type: 'submit' }, 'Use token'));
  fill(main, form);
  input.focus();
}

export async function route() {
  current.stop();
  current = { stop: () => {} };
  say('');
  if (token() === null) {
    tokenForm();
    return;
  }
  const { path, params } = location();
  const found = ROUTES.find(([re]) => re.test(path));
  for (const a of document.querySelectorAll('nav a')) {
    if (found && a.dataset.page === found[1]) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!found) {
    fill(main, h('h1', {}, 'Not found'), h('p', {}, `No page ${path}.`));
    return;
  }
  const [re, , page] = found;
  const args = path.match(re).slice(1);
  const stops = [];
  const ctx = {
    main,
    params,
    // Re-runs `fn` every `ms` while this page is shown.
    every(ms, fn) {
      let t = null;
      let stopped = false;
      const tick = async () => {
        try { await fn(); } catch (e) { /* shown by fn */ }
        if (!stopped) t = setTimeout(tick, ms);
      };
      t = setTimeout(tick, ms);
      stops.push(() => { stopped = true; clearTimeout(t); });
    },
  };
  current = { stop: () => stops.forEach((f) => f()) };
  try {
    await page(ctx, ...args);
  } catch (e) {
    if (e.status !== 401) fill(main, h('h1', {}, 'Error'), h('p', { class: 'error', role: 'alert' }, e.message));
  }
}

window.addEventListener('sy-unauthorized', (e) => {
  forgetToken();
  tokenForm(`The server refused the token: ${e.detail}`);
});
window.addEventListener('hashchange', async () => {
  await route();
  // Keyboard and screen-reader users start at the new page's content.
  if (document.activeElement === document.body || !document.activeElement) main.focus({ preventScroll: true });
});
document.getElementById('token-button').addEventListener('click', () => {
  forgetToken();
  tokenForm();
});
route();
