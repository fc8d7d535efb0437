// Overview: Redis, the queues (depth, latency, paused, an hour of
// throughput and failures), the scheduler, consumers and their workers.
import uPlot from './vendor/uPlot.esm.js';
import { h, replace, fmtAgo, fmtBytes, fmtSeconds, fmtTime, progressBar, table } from './dom.js';

export function mount(root, ctx) {
  const redisBox = h('div', { id: 'redis-state' }, 'Loading…');
  const queuesBox = h('div', { id: 'queues' });
  const chartBox = h('div', { id: 'throughput-chart', class: 'chart' });
  const chartNote = h('p', { class: 'muted small', id: 'throughput-totals' });
  const schedulerBox = h('div', { id: 'scheduler-state' });
  const consumersBox = h('div', { id: 'consumers' });
  root.append(
    h('section', { class: 'card', id: 'redis-card' }, h('h2', {}, 'Redis'), redisBox),
    h('section', { class: 'card', id: 'scheduler-card' }, h('h2', {}, 'Scheduler'), schedulerBox),
    h('section', { class: 'card wide' }, h('h2', {}, 'Queues'), queuesBox),
    h('section', { class: 'card wide' }, h('h2', {}, 'Last hour: tasks completed and failed per minute'), chartBox, chartNote),
    h('section', { class: 'card wide' }, h('h2', {}, 'Consumers and workers'), consumersBox));

  let plot = null;
  const onResize = () => { if (plot) plot.setSize({ width: chartWidth(), height: 220 }); };
  window.addEventListener('resize', onResize);
  function chartWidth() { return Math.max(320, chartBox.clientWidth || 600); }

  function drawChart(activity) {
    const n = activity.minutes;
    const xs = Array.from({ length: n }, (_, i) => activity.start + i * activity.step);
    const done = new Array(n).fill(0);
    const failed = new Array(n).fill(0);
    for (const q of Object.values(activity.queues)) {
      q.complete.forEach((v, i) => { done[i] += v; });
      q.failed.forEach((v, i) => { failed[i] += v; });
    }
    const data = [xs, done, failed];
    if (!plot) {
      plot = new uPlot({
        width: chartWidth(), height: 220,
        series: [{}, { label: 'completed', stroke: '#2e7d32', fill: 'rgba(46,125,50,0.12)', points: { show: false } },
          { label: 'failed', stroke: '#c62828', fill: 'rgba(198,40,40,0.12)', points: { show: false } }],
        axes: [{}, { label: 'tasks / min' }],
        scales: { y: { range: (u, min, max) => [0, Math.max(5, max)] } },
      }, data, chartBox);
    } else {
      plot.setData(data);
    }
    const sum = (a) => a.reduce((x, y) => x + y, 0);
    chartNote.textContent = `${sum(done)} completed, ${sum(failed)} failed in the last hour (all queues).`;
    chartBox.dataset.completed = String(sum(done));
    chartBox.dataset.failed = String(sum(failed));
  }

  function renderRedis(result) {
    if (result.status === 'rejected') {
      replace(redisBox, h('p', { class: 'bad' }, 'No answer from the status endpoint: ' + result.reason.message));
      return;
    }
    const health = result.value.data;
    const redis = (health.checks && health.checks.redis) || {};
    const memory = redis.memory || {};
    const rows = [];
    rows.push(h('p', { class: redis.ok ? 'good' : 'bad', id: 'redis-reachable', 'data-ok': redis.ok ? '1' : '0' },
      redis.ok ? 'Redis reachable' : 'Redis unreachable: ' + (redis.error || 'no answer')));
    if (redis.ok) {
      rows.push(h('p', {}, 'Memory: ', fmtBytes(memory.used),
        memory.maxmemory ? ` of ${fmtBytes(memory.maxmemory)} (${Math.round((memory.ratio || 0) * 100)}%)` : ' (no maxmemory)',
        redis.maxmemory_policy ? ` · policy ${redis.maxmemory_policy}` : ''));
    }
    rows.push(h('p', {}, 'Health: ', h('span', { class: `badge health-${health.status}`, id: 'health-status' }, health.status)));
    const notes = [...(health.reasons || []).map((r) => ['bad', r]), ...(health.warnings || []).map((w) => ['warn', w])];
    if (notes.length) rows.push(h('ul', { class: 'reasons', id: 'health-reasons' }, notes.map(([k, t]) => h('li', { class: k }, t))));
    replace(redisBox, rows);
  }

  function renderQueues(queue, activity) {
    if (queue.status === 'rejected') {
      queuesBox.classList.add('stale');
      if (!queuesBox.childElementCount) replace(queuesBox, h('p', { class: 'muted' }, 'Not available: ' + queue.reason.message));
      return;
    }
    queuesBox.classList.remove('stale');
    const act = activity.status === 'fulfilled' ? activity.value.queues : {};
    const canPause = ctx.can('POST /queue/pause');
    const canResume = ctx.can('POST /queue/resume');
    const rows = Object.entries(queue.value.queues).map(([name, q]) => {
      const a = act[name] || {};
      const paused = a.paused === true || q.paused === true;
      const actions = [];
      if (ctx.can('POST /queue/purge')) {
        actions.push(h('button', { type: 'button', class: 'danger small', 'data-action': 'purge-queue', 'data-queue': name, onclick: () => purge(name) }, 'Purge…'));
      }
      if (paused && canResume) {
        actions.push(h('button', { type: 'button', class: 'small', 'data-action': 'resume', onclick: () => ctx.act('/queue/resume', { queue: name }, `Queue ${name} resumed.`) }, 'Resume'));
      } else if (!paused && canPause) {
        actions.push(h('button', { type: 'button', class: 'small', 'data-action': 'pause', onclick: () => ctx.act('/queue/pause', { queue: name }, `Queue ${name} paused.`) }, 'Pause'));
      }
      return h('tr', { 'data-queue': name },
        h('td', {}, h('a', { href: `#/tasks?queue=${encodeURIComponent(name)}` }, name)),
        h('td', { class: 'num', 'data-field': 'pending' }, q.pending),
        h('td', { class: 'num', 'data-field': 'latency' }, a.latency === undefined ? '—' : fmtSeconds(a.latency)),
        h('td', { class: 'num' }, q.scheduled),
        h('td', { class: 'num' }, q.running),
        h('td', { class: 'num' }, h('a', { href: `#/dead-letters?queue=${encodeURIComponent(name)}` }, q.dead_letters)),
        h('td', { class: 'num' }, `${q.consumers} / ${q.workers}`),
        h('td', { 'data-field': 'paused' }, paused ? h('span', { class: 'badge paused' }, 'paused') : h('span', { class: 'badge active' }, 'active')),
        h('td', { class: 'actions' }, actions));
    });
    replace(queuesBox, table(['Queue', 'Pending', 'Latency', 'Scheduled', 'Running', 'Dead letters', 'Consumers / workers', 'State', ''], rows, { id: 'queue-table' }));
  }

  async function purge(name) {
    // The endpoint answers a purge without "confirm" with the count it
    // would remove: shown in the confirmation.
    let count = '';
    try {
      await ctx.api.post('/queue/purge', { queue: name });
    } catch (err) {
      if (err.status === 401) return;
      count = err.message;
    }
    if (!await ctx.confirm(`Purge queue ${name}? ${count}. Purged tasks end revoked; this cannot be undone.`, 'Purge')) return;
    await ctx.act('/queue/purge', { queue: name, confirm: true }, (a) => `Purged ${a.purged} task(s) from queue ${a.queue}.`);
  }

  function renderScheduler(result) {
    if (result.status === 'rejected') {
      schedulerBox.classList.add('stale');
      return;
    }
    schedulerBox.classList.remove('stale');
    const parts = Object.entries(result.value.queues).map(([name, q]) => {
      const s = q.scheduler;
      const who = s.leader_present
        ? h('p', { class: 'good', 'data-field': 'leader' }, `Leader: ${s.host || '?'} (pid ${s.pid ?? '?'}), since ${fmtTime(s.since)}`)
        : h('p', { class: s.deployed ? 'bad' : 'muted', 'data-field': 'leader' }, s.deployed ? 'No leader right now' : 'No scheduler has run on this queue');
      return h('div', { 'data-queue': name },
        h('h3', {}, `Queue ${name}`), who,
        h('p', {}, 'Last periodic slot: ', s.last_slot ? `${s.last_slot} (${s.last_slot_task || '?'})` : '—'),
        h('p', {}, 'Next periodic slot: ', q.next_slot ? `${q.next_slot} (${fmtAgo(q.next_slot_at)})` : '—'),
        h('p', { class: 'small' }, h('a', { href: '#/periodic' }, `${q.entries.length} periodic entr${q.entries.length === 1 ? 'y' : 'ies'}`)));
    });
    replace(schedulerBox, parts);
  }

  function renderConsumers(workers, running) {
    if (workers.status === 'rejected') {
      consumersBox.classList.add('stale');
      return;
    }
    consumersBox.classList.remove('stale');
    const progress = new Map();
    if (running.status === 'fulfilled') for (const t of running.value.tasks) progress.set(t.id, t);
    const consumers = workers.value.consumers.filter((c) => c.alive);
    if (!consumers.length) {
      replace(consumersBox, h('p', { class: 'muted' }, 'No live consumer.'));
      return;
    }
    replace(consumersBox, consumers.map((c) => h('div', { class: 'consumer', 'data-consumer': c.identity },
      h('h3', {}, c.identity),
      h('p', { class: 'muted small' }, `queue ${c.queue} · ${c.worker_type} workers · pid ${c.pid} · v${c.version || '?'} · started ${fmtTime(c.started)} · heartbeat ${fmtAgo(c.last_heartbeat)} · ${c.done} done, ${c.failed} failed, ${c.restarts} restarts`),
      table(['Worker', 'pid', 'State', 'Task', 'Progress', 'Done', 'Failed'], c.workers.map((w) => {
        const t = w.current_task;
        const record = t ? progress.get(t.id) : null;
        return h('tr', { 'data-worker': w.worker, 'data-task-id': t ? t.id : '' },
          h('td', {}, w.worker), h('td', {}, w.pid ?? '—'),
          h('td', {}, h('span', { class: `badge ${w.busy ? 'busy' : w.alive ? 'idle' : 'dead'}` }, w.busy ? 'busy' : w.alive ? 'idle' : 'dead')),
          h('td', {}, t ? [h('a', { href: `#/task/${encodeURIComponent(t.id)}` }, t.name || t.id), h('span', { class: 'muted small' }, ` started ${fmtAgo(t.started)}`)] : '—'),
          h('td', {}, t ? progressBar(record && record.progress) : ''),
          h('td', { class: 'num' }, w.done), h('td', { class: 'num' }, w.failed));
      }), { class: 'workers' }))));
  }

  async function poll() {
    const [health, queue, workers, running, activity, sched] = await Promise.allSettled([
      ctx.api.request('GET', '/health', undefined, [503]),
      ctx.api.get('/queue'),
      ctx.api.get('/workers'),
      ctx.api.get('/tasks?state=running&limit=200'),
      ctx.api.get('/activity'),
      ctx.api.get('/periodic'),
    ]);
    renderRedis(health);
    renderQueues(queue, activity);
    if (activity.status === 'fulfilled') { chartBox.classList.remove('stale'); drawChart(activity.value); } else chartBox.classList.add('stale');
    renderScheduler(sched);
    renderConsumers(workers, running);
    if (health.status === 'rejected') throw health.reason;
  }

  return {
    poll,
    destroy() { window.removeEventListener('resize', onResize); if (plot) plot.destroy(); },
  };
}
