// Tasks: GET /tasks with its filters (state, name, time window, queue)
// kept in the URL's hash, a page at a time through its cursor.
import { h, replace, badge, fmtSeconds, fmtTime, progressBar, table } from './dom.js';

export const STATES = ['pending', 'scheduled', 'running', 'retrying', 'complete', 'failed',
  'revoked', 'expired', 'canceled', 'interrupted', 'lost'];
const WINDOWS = [['', 'any time'], ['900', 'last 15 min'], ['3600', 'last hour'],
  ['86400', 'last 24 h'], ['604800', 'last 7 days']];
const FIELDS = ['updated', 'enqueued', 'started', 'finished'];

export function mount(root, ctx, where) {
  const p = where.params;
  const select = (name, options, value) => h('select', { name, id: `filter-${name}` },
    options.map(([v, label]) => h('option', { value: v, selected: v === value }, label)));
  const form = h('form', { class: 'filters', id: 'task-filters' },
    h('label', {}, 'State ', select('state', [['', 'any'], ...STATES.map((s) => [s, s])], p.get('state') || '')),
    h('label', {}, 'Task ', h('input', { name: 'name', id: 'filter-name', list: 'task-names', value: p.get('name') || '', placeholder: 'module.function', size: 28 })),
    h('datalist', { id: 'task-names' }),
    h('label', {}, 'Window ', select('window', WINDOWS, p.get('window') || '')),
    h('label', {}, 'by ', select('field', FIELDS.map((f) => [f, f]), p.get('field') || 'updated')),
    h('label', {}, 'Queue ', h('select', { name: 'queue', id: 'filter-queue' }, h('option', { value: '' }, 'default'))),
    h('button', { type: 'submit', id: 'filter-apply' }, 'Apply'),
    h('a', { href: '#/tasks', class: 'small' }, 'clear'));
  const listBox = h('div', { id: 'task-list' }, 'Loading…');
  const pager = h('div', { class: 'pager' });
  root.append(h('section', { class: 'card wide' }, h('h2', {}, 'Tasks'), form, listBox, pager));

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v.trim());
    ctx.navigate('#/tasks' + (q.toString() ? '?' + q : ''));
  });

  // The names and queues known, for the filters' choices (once).
  ctx.api.get('/task-names').then((t) => {
    replace(form.querySelector('#task-names'), (t.tasks || []).map((x) => h('option', { value: x.name })));
  }).catch(() => {});
  ctx.api.get('/queue').then((q) => {
    const queueSelect = form.querySelector('#filter-queue');
    replace(queueSelect, Object.keys(q.queues).map((name) => h('option', { value: name, selected: name === p.get('queue') }, name)));
  }).catch(() => {});

  // The window is fixed when the listing opens, so its pages line up.
  const since = p.get('window') ? Date.now() / 1000 - Number(p.get('window')) : null;
  const cursors = [null];   // the cursor of each page seen so far
  let page = 0;
  let next = null;

  function query() {
    const q = new URLSearchParams({ limit: '50' });
    for (const key of ['state', 'name', 'queue', 'field']) if (p.get(key)) q.set(key, p.get(key));
    if (since !== null) q.set('since', since.toFixed(3));
    if (cursors[page]) q.set('cursor', cursors[page]);
    return '/tasks?' + q;
  }

  function render(answer) {
    next = answer.next_cursor;
    const rows = answer.tasks.map((t) => h('tr', { 'data-task-id': t.id, 'data-state': t.state },
      h('td', {}, h('a', { href: `#/task/${encodeURIComponent(t.id)}`, class: 'mono' }, t.id)),
      h('td', {}, t.name || '—'),
      h('td', {}, badge(t.state)),
      h('td', {}, fmtTime(t.enqueued || t.first_seen)),
      h('td', {}, fmtTime(t.started)),
      h('td', {}, fmtTime(t.finished)),
      h('td', { class: 'num' }, t.duration === null || t.duration === undefined ? '—' : fmtSeconds(t.duration)),
      h('td', { class: 'num' }, t.attempt),
      h('td', {}, t.state === 'running' ? progressBar(t.progress) : '')));
    replace(listBox, rows.length
      ? table(['Id', 'Task', 'State', 'Enqueued', 'Started', 'Finished', 'Duration', 'Attempt', 'Progress'], rows, { id: 'task-table' })
      : h('p', { class: 'muted', id: 'no-tasks' }, 'No task matches.'));
    replace(pager,
      h('button', { type: 'button', id: 'page-newer', disabled: page === 0, onclick: () => { page -= 1; ctx.pollNow(); } }, '← Newer'),
      h('span', { class: 'muted' }, ` page ${page + 1} `),
      h('button', { type: 'button', id: 'page-older', disabled: !next, onclick: () => { cursors[page + 1] = next; page += 1; ctx.pollNow(); } }, 'Older →'));
  }

  async function poll() {
    try {
      render(await ctx.api.get(query()));
      listBox.classList.remove('stale');
    } catch (err) {
      listBox.classList.add('stale');
      if (err.status === 400 || err.status === 404) replace(listBox, h('p', { class: 'bad' }, err.message));
      throw err;
    }
  }
  return { poll };
}
