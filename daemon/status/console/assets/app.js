// The console's shell: routing by the URL's hash, polling the page shown
// every POLL_MS while the tab is visible, sign-in, confirmations, notices.
import * as api from './api.js';
import { h, replace } from './dom.js';
import * as overview from './overview.js';
import * as tasks from './tasks.js';
import * as task from './task.js';
import * as deadLetters from './deadletters.js';
import * as periodic from './periodic.js';

const POLL_MS = 2500;
const PAGES = { overview, tasks, task, 'dead-letters': deadLetters, periodic };
const $ = (id) => document.getElementById(id);

const state = {
  routes: new Set(),     // "POST /tasks/<id>/retry", ... as GET / lists them
  view: null,            // {poll, destroy} of the page shown
  timer: null,
  polling: false,
  generation: 0,
};

// --- what the endpoint offers -------------------------------------------------
async function loadRoutes() {
  try {
    const index = await api.get('/');
    state.routes = new Set(index.routes || []);
  } catch (err) {
    if (err.status !== 401) throw err;
  }
}

// --- notices, banner, live state ------------------------------------------------
let noticeTimer = null;
function notify(text, kind = 'ok') {
  const el = $('notice');
  replace(el, text);
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.hidden = true; }, kind === 'error' ? 12000 : 6000);
}

function banner(text) {
  const el = $('banner');
  if (text) { replace(el, text); el.hidden = false; } else { el.hidden = true; }
}

function liveState(text, kind) {
  const el = $('live-state');
  el.textContent = text;
  el.dataset.kind = kind;
}

// --- sign-in ------------------------------------------------------------------
let signinWaiters = [];
function showSignin(why) {
  const dialog = $('signin-dialog');
  if (why) $('signin-why').textContent = why;
  if (!dialog.open) dialog.showModal();
  $('token-input').focus();
  return new Promise((resolve) => signinWaiters.push(resolve));
}

function closeSignin(ok) {
  const dialog = $('signin-dialog');
  if (dialog.open) dialog.close();
  const waiters = signinWaiters;
  signinWaiters = [];
  for (const resolve of waiters) resolve(ok);
}

function updateSigninButton() {
  const button = $('signin-button');
  button.textContent = api.token() ? 'Sign out' : 'Sign in';
  button.dataset.signedIn = api.token() ? '1' : '';
}

function wireSignin() {
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) return;
    api.setToken(value);
    $('token-input').value = '';
    updateSigninButton();
    closeSignin(true);
    loadRoutes().finally(pollNow);
  });
  $('signin-cancel').addEventListener('click', () => closeSignin(false));
  $('signin-dialog').addEventListener('cancel', () => closeSignin(false));
  $('signin-button').addEventListener('click', () => {
    if (api.token()) {
      api.clearToken();
      updateSigninButton();
      notify('Signed out: the token is forgotten by this tab.');
    } else {
      showSignin('Actions need the status endpoint\'s token ([status] token).');
    }
  });
  api.on('unauthorized', (path, hadToken) => {
    if (hadToken) api.clearToken();
    updateSigninButton();
    showSignin(hadToken ? 'The token was refused: sign in again.'
      : 'This needs the status endpoint\'s token ([status] token).');
  });
}

// --- confirmations ------------------------------------------------------------
function confirmAction(text, okLabel = 'Confirm') {
  const dialog = $('confirm-dialog');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => {
      $('confirm-ok').removeEventListener('click', yes);
      $('confirm-cancel').removeEventListener('click', no);
      dialog.removeEventListener('cancel', no);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $('confirm-ok').addEventListener('click', yes);
    $('confirm-cancel').addEventListener('click', no);
    dialog.addEventListener('cancel', no);
    dialog.showModal();
  });
}

// An action: POST with the token (asked for first when there is none),
// then a notice of what happened, then a fresh poll.
async function act(path, body, done) {
  if (!api.token()) {
    const ok = await showSignin('Actions need the status endpoint\'s token ([status] token).');
    if (!ok) return null;
  }
  try {
    const answer = await api.post(path, body);
    notify(typeof done === 'function' ? done(answer) : done || 'Done.');
    return answer;
  } catch (err) {
    if (err.status !== 401) notify(`Refused: ${err.message}`, 'error');
    return null;
  } finally {
    pollNow();
  }
}

// --- routing ------------------------------------------------------------------
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || '');
  if (!parts.length) return { page: 'overview', params };
  if (parts[0] === 'task' && parts[1]) return { page: 'task', id: parts[1], params };
  return { page: PAGES[parts[0]] ? parts[0] : 'overview', params };
}

function navigate(hash) { location.hash = hash; }

function route() {
  const where = parseHash();
  state.generation += 1;
  if (state.view && state.view.destroy) state.view.destroy();
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('active', link.dataset.nav === (where.page === 'task' ? 'tasks' : where.page));
  }
  const root = $('page');
  replace(root);
  document.body.dataset.page = where.page;
  state.view = PAGES[where.page].mount(root, ctx, where);
  pollNow();
}

// --- polling ------------------------------------------------------------------
async function poll() {
  if (state.polling || !state.view) return;
  const generation = state.generation;
  state.polling = true;
  try {
    await state.view.poll();
    if (generation === state.generation) {
      liveState('live · ' + new Date().toLocaleTimeString(), 'live');
    }
  } catch (err) {
    liveState(err.status === 0 ? 'endpoint unreachable' : 'error', 'error');
  } finally {
    state.polling = false;
    document.body.dataset.polled = String(Date.now());
  }
}

function schedule() {
  clearTimeout(state.timer);
  if (document.visibilityState !== 'visible') {
    liveState('paused (tab hidden)', 'paused');
    return;   // visibilitychange starts it again
  }
  state.timer = setTimeout(async () => { await poll(); schedule(); }, POLL_MS);
}

async function pollNow() {
  clearTimeout(state.timer);
  if (document.visibilityState === 'visible') await poll();
  schedule();
}

// Pages see this: the routes offered, actions, navigation, the banner.
const ctx = {
  can: (route) => state.routes.has(route),
  act,
  confirm: confirmAction,
  notify,
  banner,
  navigate,
  pollNow,
  api,
};

// Any answer from Redis-backed routes says whether Redis is there.
api.on('answered', (status, path, data) => {
  if (status === 503 && data && /Redis/i.test(data.detail || '')) {
    banner('Redis unreachable: ' + data.detail + ' (the pages show the last data they had)');
  } else if (status === 0) {
    banner('The status endpoint does not answer: is huey-worker status-server running?');
  } else if (status >= 200 && status < 300 && path !== '/') {
    banner(null);
  }
});

async function start() {
  wireSignin();
  updateSigninButton();
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') pollNow(); else schedule();
  });
  window.addEventListener('hashchange', route);
  try { await loadRoutes(); } catch (err) { banner('Cannot read the route list: ' + err.message); }
  route();
}

start();
