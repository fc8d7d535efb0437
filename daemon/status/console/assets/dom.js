// Building DOM nodes without innerHTML: every value from the endpoint goes
// in as text, so a task name or an error message cannot inject markup.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else if (key in el && !key.startsWith('data-') && key !== 'list') el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const pad = (n) => String(n).padStart(2, '0');

export function fmtTime(ts) {
  if (ts === null || ts === undefined || ts === '') return '—';
  const d = new Date(ts * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtSeconds(s) {
  if (s === null || s === undefined) return '—';
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 172800) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

export function fmtAgo(ts, now = Date.now() / 1000) {
  if (ts === null || ts === undefined) return '—';
  const s = now - ts;
  return s >= 0 ? fmtSeconds(s) + ' ago' : 'in ' + fmtSeconds(-s);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

export function badge(state) {
  return h('span', { class: `badge state-${state || 'unknown'}`, 'data-state': state || '' }, state || 'unknown');
}

export function progressBar(progress) {
  if (!progress) return h('span', { class: 'muted' }, '—');
  const pct = typeof progress.percent === 'number' ? progress.percent : null;
  const label = pct !== null ? `${pct}%` :
    (progress.total ? `${progress.current}/${progress.total}` : String(progress.current ?? ''));
  return h('span', { class: 'progress' },
    h('progress', { max: 100, value: pct ?? 0, 'data-percent': pct ?? '' }),
    h('span', { class: 'progress-label' }, label),
    progress.message ? h('span', { class: 'muted small' }, ' ' + progress.message) : null);
}

export function json(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

export function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '—')]));
}

export function table(headers, rows, attrs = {}) {
  return h('table', attrs,
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows));
}
