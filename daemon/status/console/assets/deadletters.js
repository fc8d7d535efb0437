// Dead letters: messages set aside instead of run, with why, their raw
// size, and requeue or purge (one, or all after a confirmation).
import { h, replace, fmtBytes, fmtTime, table } from './dom.js';

export function mount(root, ctx, where) {
  const queue = where.params.get('queue') || '';
  const countBox = h('p', { id: 'dead-count', class: 'muted' });
  const bulk = h('div', { class: 'actions' });
  const listBox = h('div', { id: 'dead-list' }, 'Loading…');
  root.append(h('section', { class: 'card wide' }, h('h2', {}, 'Dead letters', queue ? ` of queue ${queue}` : ''), countBox, bulk, listBox));
  const withQueue = (body) => (queue ? { ...body, queue } : body);
  const canRequeue = ctx.can('POST /dead-letters/requeue');
  const canPurge = ctx.can('POST /dead-letters/purge');

  const requeue = (ids) => ctx.act('/dead-letters/requeue', withQueue(ids ? { ids } : { all: true }),
    (a) => `Requeued ${a.requeued} message(s).`);
  async function purge(ids, what) {
    if (!await ctx.confirm(`Purge ${what}? The message${ids && ids.length === 1 ? ' is' : 's are'} deleted for good.`, 'Purge')) return;
    await ctx.act('/dead-letters/purge', withQueue(ids ? { ids } : { all: true }), (a) => `Purged ${a.purged} dead letter(s).`);
  }

  replace(bulk,
    canRequeue ? h('button', { type: 'button', 'data-action': 'requeue-all', onclick: () => requeue(null) }, 'Requeue all') : null,
    canPurge ? h('button', { type: 'button', class: 'danger', 'data-action': 'purge-all', onclick: () => purge(null, 'every dead letter') }, 'Purge all…') : null);

  let shown = '';
  function render(answer) {
    countBox.textContent = `${answer.count} dead letter(s) in queue ${answer.queue}` +
      (answer.count > answer.dead_letters.length ? ` (the newest ${answer.dead_letters.length} shown)` : '');
    // Rows are rebuilt only when the list changed (no button swapped
    // under the pointer between two polls).
    const key = answer.dead_letters.map((d) => d.id).join(',');
    if (key === shown) return;
    shown = key;
    const rows = answer.dead_letters.map((d) => h('tr', { 'data-dead-id': d.id || '', 'data-task-id': d.task_id || '' },
      h('td', {}, fmtTime(d.at)),
      h('td', {}, h('span', { class: 'badge failed' }, d.reason || '?')),
      h('td', { class: 'detail' }, d.detail || '', d.hint ? h('div', { class: 'muted small' }, d.hint) : null),
      h('td', {}, d.task_name || '—'),
      h('td', {}, d.task_id ? h('a', { href: `#/task/${encodeURIComponent(d.task_id)}`, class: 'mono' }, d.task_id) : '—'),
      h('td', { class: 'num', 'data-field': 'size' }, fmtBytes(d.message_bytes)),
      h('td', { class: 'actions' },
        canRequeue && d.id ? h('button', { type: 'button', class: 'small', 'data-action': 'requeue', onclick: () => requeue([d.id]) }, 'Requeue') : null,
        canPurge && d.id ? h('button', { type: 'button', class: 'small danger', 'data-action': 'purge', onclick: () => purge([d.id], 'this dead letter') }, 'Purge') : null)));
    replace(listBox, rows.length
      ? table(['Set aside', 'Reason', 'Detail', 'Task', 'Task id', 'Raw size', ''], rows, { id: 'dead-table' })
      : h('p', { class: 'muted', id: 'no-dead' }, 'No dead letter.'));
  }

  async function poll() {
    try {
      render(await ctx.api.get('/dead-letters?limit=200' + (queue ? '&queue=' + encodeURIComponent(queue) : '')));
      listBox.classList.remove('stale');
    } catch (err) {
      listBox.classList.add('stale');
      throw err;
    }
  }
  return { poll };
}
