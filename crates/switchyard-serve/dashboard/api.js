// The dashboard's only way to the data: the public REST API under /api/v1,
// with the bearer token entered once and kept for the tab (sessionStorage).

const KEY = 'switchyard.token';

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  sessionStorage.setItem(KEY, t);
}

export function forgetToken() {
  sessionStorage.removeItem(KEY);
}

/** An API error: the HTTP status and the server's message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API; resolves to the JSON answer, rejects with an ApiError. */
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  } else if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
  }
  let r;
  try {
    r = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    throw new ApiError(0, `cannot reach the server: ${e.message}`);
  }
  let v = null;
  try {
    v = await r.json();
  } catch {
    v = null;
  }
  if (!r.ok) {
    const message = v && v.error ? v.error.message : `HTTP ${r.status}`;
    const err = new ApiError(r.status, message);
    if (r.status === 401) window.dispatchEvent(new CustomEvent('sy-unauthorized', { detail: message }));
    throw err;
  }
  return v;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);

/** `?a=1&b=2` from an object, leaving out empty values. */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '' && v !== false) u.set(k, String(v));
  }
  const s = u.toString();
  return s ? `?${s}` : '';
}
