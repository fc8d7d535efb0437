// Periodic tasks: each entry's schedule, last slot and next run, and the
// scheduler leader that enqueues them.
import { h, replace, fmtAgo, fmtTime, table } from './dom.js';

export function mount(root, ctx) {
  const box = h('div', { id: 'periodic' }, 'Loading…');
  root.append(h('section', { class: 'card wide' }, h('h2', {}, 'Periodic tasks'), box));

  function render(answer) {
    const parts = [];
    if (answer.error) parts.push(h('p', { class: 'bad' }, 'This endpoint cannot load its periodic entries: ', answer.error));
    for (const [name, q] of Object.entries(answer.queues)) {
      const s = q.scheduler;
      parts.push(h('h3', {}, `Queue ${name}`),
        h('p', { class: s.leader_present ? 'good' : (s.deployed ? 'bad' : 'muted') },
          s.leader_present ? `Scheduler leader: ${s.host || '?'} (pid ${s.pid ?? '?'}), since ${fmtTime(s.since)}; ${s.slots_enqueued ?? 0} slots enqueued`
            : s.deployed ? 'No scheduler leader right now: periodic slots wait.' : 'No scheduler has run on this queue.'));
      const rows = q.entries.map((e) => h('tr', { 'data-entry': e.key },
        h('td', { class: 'mono' }, e.key),
        h('td', {}, e.task || '—'),
        h('td', { class: 'mono' }, e.schedule || '—'),
        h('td', {}, e.last_slot ? `${e.last_slot} (${fmtAgo(e.last_slot_at)})` : '—'),
        h('td', { 'data-field': 'next' }, e.next_slot ? `${e.next_slot} (${fmtAgo(e.next_slot_at)})` : (e.declared_here ? 'not within 8 days' : 'unknown here')),
        h('td', { class: 'muted small' }, e.origin || (e.run_by_leader ? 'the leader\'s entries' : ''))));
      parts.push(rows.length
        ? table(['Entry', 'Task', 'Schedule (UTC)', 'Last slot', 'Next run', 'Declared in'], rows, { class: 'periodic-table' })
        : h('p', { class: 'muted' }, 'No periodic entry.'));
    }
    replace(box, parts);
  }

  async function poll() {
    try {
      render(await ctx.api.get('/periodic'));
      box.classList.remove('stale');
    } catch (err) {
      box.classList.add('stale');
      throw err;
    }
  }
  return { poll };
}
