// One task: its record, live progress, history as a timeline, result or
// error, and the actions its state allows (those GET / lists).
import { h, replace, badge, dl, fmtSeconds, fmtTime, json, progressBar } from './dom.js';

const RETRYABLE = ['failed', 'lost', 'revoked', 'canceled'];
const REVOCABLE = ['pending', 'scheduled', 'retrying'];

export function mount(root, ctx, where) {
  const id = where.id;
  const head = h('h2', {}, 'Task ', h('span', { class: 'mono', id: 'task-id' }, id), ' ', h('span', { id: 'task-state' }));
  const actionsBox = h('div', { class: 'actions', id: 'task-actions' });
  const body = h('div', { id: 'task-body' }, 'Loading…');
  root.append(h('section', { class: 'card wide' }, head, actionsBox, body));
  const path = `/tasks/${encodeURIComponent(id)}`;

  function button(action, label, cls, run) {
    return h('button', { type: 'button', class: cls, 'data-action': action, onclick: run }, label);
  }

  let shownFor = null;
  function renderActions(t) {
    // Left alone while the state stays: a button is not swapped under a
    // pointer about to click it.
    if (shownFor === t.state) return;
    shownFor = t.state;
    const out = [];
    if (RETRYABLE.includes(t.state) && ctx.can('POST /tasks/<id>/retry')) {
      out.push(button('retry', 'Retry', '', () => ctx.act(path + '/retry', {}, 'Retried: a new delivery of the same task.')));
    }
    if (REVOCABLE.includes(t.state) && ctx.can('POST /tasks/<id>/revoke')) {
      out.push(button('revoke', 'Revoke', 'danger', () => ctx.act(path + '/revoke', {}, 'Revoked: the worker that takes it will skip it.')));
    }
    if (t.state === 'revoked' && ctx.can('POST /tasks/<id>/restore')) {
      out.push(button('restore', 'Restore', '', () => ctx.act(path + '/restore', {}, (a) => a.already ? 'It was not revoked.' : 'Restored: it will run.')));
    }
    if (t.state === 'running' && ctx.can('POST /tasks/<id>/cancel')) {
      out.push(button('cancel', 'Cancel', 'danger', async () => {
        if (await ctx.confirm(`Cancel the running task ${id}?`, 'Cancel the task')) ctx.act(path + '/cancel', {}, 'Cancel requested.');
      }));
    }
    replace(actionsBox, out.length ? out : h('span', { class: 'muted small' },
      ctx.can('POST /tasks/<id>/retry') ? `No action applies to a ${t.state} task.` : 'Actions are off: the endpoint has no [status] token.'));
  }

  function argsView(t) {
    if (t.args_sensitive && t.args === null) return h('p', { class: 'muted' }, 'Masked: the task declares its arguments sensitive.');
    if (t.args === null || t.args === undefined) return h('p', { class: 'muted' }, 'Not recorded.');
    return [json(t.args), t.args_truncated ? h('p', { class: 'muted small' }, 'Cut to [journal] args_max_bytes.') : null,
      t.args_sensitive ? h('p', { class: 'muted small' }, 'Sensitive arguments are masked.') : null];
  }

  function timeline(history) {
    if (!history || !history.length) return h('p', { class: 'muted' }, 'No history recorded.');
    return h('ol', { class: 'timeline', id: 'task-history' }, history.map((e) => {
      const extra = Object.entries(e).filter(([k]) => k !== 'state' && k !== 'at')
        .map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' · ');
      return h('li', { 'data-state': e.state },
        h('span', { class: 'when' }, fmtTime(e.at)), ' ', badge(e.state), extra ? h('span', { class: 'muted small' }, ' ' + extra) : null);
    }));
  }

  function outcome(t) {
    if (t.error) {
      return h('div', { class: 'error', id: 'task-error' },
        h('p', {}, h('strong', {}, t.error.type || 'Error'), ': ', t.error.message || ''),
        t.error.dead_letter ? h('p', { class: 'muted small' }, 'Set aside as a dead letter: ', t.error.dead_letter) : null,
        t.error.traceback ? h('pre', { class: 'traceback' }, t.error.traceback) : null);
    }
    if (t.result !== null && t.result !== undefined) return h('div', { id: 'task-result' }, json(t.result));
    if (t.result_omitted) return h('p', { class: 'muted' }, 'Result not shown: ', t.result_omitted);
    return h('p', { class: 'muted' }, t.terminal ? 'No result.' : 'Not finished yet.');
  }

  let drawn = null;
  function render(t) {
    replace(head.querySelector('#task-state'), badge(t.state));
    renderActions(t);
    // An unchanged record is not drawn again: a traceback being scrolled
    // or selected for copying stays put between polls.
    const key = JSON.stringify(t);
    if (key === drawn) return;
    drawn = key;
    const w = t.worker;
    replace(body,
      dl([
        ['Task', t.name], ['Queue', t.queue],
        ['Enqueued', fmtTime(t.enqueued || t.first_seen)], ['Started', fmtTime(t.started)],
        ['Finished', fmtTime(t.finished)], ['Duration', t.duration === null || t.duration === undefined ? '—' : fmtSeconds(t.duration)],
        t.eta ? ['ETA', fmtTime(t.eta)] : null, t.next_retry ? ['Next retry', fmtTime(t.next_retry)] : null,
        ['Attempt', `${t.attempt}${t.retries_left !== null && t.retries_left !== undefined ? ` (${t.retries_left} retries left)` : ''}`],
        t.retried ? ['Retried', `${t.retried} time(s), last ${fmtTime(t.retried_at)}`] : null,
        w ? ['Worker', `${w.host || '?'} pid ${w.pid ?? '?'} · ${w.consumer || '?'} #${w.worker ?? '?'}`] : null,
        t.last_action ? ['Last action', JSON.stringify(t.last_action)] : null,
      ]),
      h('h3', {}, 'Progress'), h('div', { id: 'task-progress' }, progressBar(t.progress)),
      h('h3', {}, 'Arguments'), argsView(t),
      h('h3', {}, t.error ? 'Error' : 'Result'), outcome(t),
      h('h3', {}, 'History'), timeline(t.history));
  }

  async function poll() {
    try {
      render(await ctx.api.get(path));
    } catch (err) {
      if (err.status === 404) {
        replace(body, h('p', { class: 'bad', id: 'task-unknown' }, `Unknown task id ${id} (never enqueued, or its record expired).`));
        replace(actionsBox);
        drawn = null;
        return;
      }
      throw err;
    }
  }
  return { poll };
}
