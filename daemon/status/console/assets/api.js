// Talking to the status endpoint's JSON routes.  The token lives in
// sessionStorage (this tab only) and goes out as a bearer header: no
// cookie, so no other site can make this browser act with it (CSRF).
const TOKEN_KEY = 'huey-worker.token';

export class HttpError extends Error {
  constructor(status, body, path) {
    const detail = body && (body.detail || body.error);
    super(detail || (status ? `HTTP ${status}` : 'no answer'));
    this.status = status;
    this.body = body;
    this.path = path;
  }
}

const listeners = { unauthorized: [], answered: [] };

export function on(kind, fn) { listeners[kind].push(fn); }
function emit(kind, ...args) { for (const fn of listeners[kind]) fn(...args); }

export function token() {
  try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; }
}
export function setToken(value) { sessionStorage.setItem(TOKEN_KEY, value); }
export function clearToken() { sessionStorage.removeItem(TOKEN_KEY); }

// The routes sit beside the console's own folder: ../health from
// /console/ is /health, and stays right behind a proxy that adds a prefix.
function url(path) { return new URL('../' + path.replace(/^\//, ''), document.baseURI).href; }

// {status, data} of a request; throws HttpError when the endpoint did not
// answer, or answered with an error (unless `accept` lists the status).
export async function request(method, path, body, accept = []) {
  const headers = { Accept: 'application/json' };
  const t = token();
  if (t) headers.Authorization = 'Bearer ' + t;
  const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (err) {
    emit('answered', 0, path);
    throw new HttpError(0, { detail: 'the status endpoint does not answer (' + err.message + ')' }, path);
  }
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  emit('answered', response.status, path, data);
  if (response.status === 401) emit('unauthorized', path, Boolean(t));
  if (!response.ok && !accept.includes(response.status)) throw new HttpError(response.status, data, path);
  return { status: response.status, data };
}

export async function get(path, accept) { return (await request('GET', path, undefined, accept)).data; }
export async function post(path, body = {}) { return (await request('POST', path, body)).data; }
