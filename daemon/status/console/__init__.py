"""The web console: a few static pages served by the status endpoint
itself, and the two JSON routes they need beyond the existing ones
(docs/console.md).

Why served from here: an operator on a plain VM has the status endpoint
already (loopback, or behind an SSH tunnel); Flask, a CDN or a build step
would each be one more thing to install or reach.  Every asset ships in
this package (assets/, the chart library vendored in assets/vendor/ with
its NOTICE), is read once from the installed files and answered by the
server's loop thread, never waiting for Redis.

Access: the page and its assets carry no data, so they are served without
the token even when the server listens beyond loopback (a browser cannot
send a bearer token with a navigation); every JSON route the page reads
still needs the token there, and every action always does.  The page asks
for the token on a 401, keeps it in sessionStorage and sends it as
`Authorization: Bearer` -- never a cookie, so there is no ambient
credential another site could ride (CSRF).

The JSON routes, also for scripts:
  GET /activity  per queue: tasks completed and failed per minute over the
                 last hour (from the journal's state indexes: 120 ZCOUNTs
                 per queue, sent in one write), queue latency and paused.
  GET /periodic  per queue: the scheduler leader, and each periodic entry
                 with its schedule, last slot and next run.
"""
import importlib.resources
import logging
import threading
import time

import redis

from ... import overview
from ...journal import reads
from ...scheduler import info as scheduler_info
from ...scheduler import periodic
from ..httpserver import Response

log = logging.getLogger('huey_worker.status')

# default-src 'self' and nothing inline: the page's scripts and styles are
# files of this package; connect-src 'self' keeps its fetches on this
# endpoint; frame-ancestors 'none' stops clickjacking of the action
# buttons.  img-src data: is for the chart library's legend markers.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = (
    ('Content-Security-Policy', CSP),
    ('X-Frame-Options', 'DENY'),
    ('Referrer-Policy', 'no-referrer'),
    ('Cross-Origin-Opener-Policy', 'same-origin'),
    ('Cross-Origin-Resource-Policy', 'same-origin'),
)
CONTENT_TYPES = {
    '.html': 'text/html; charset=utf-8',
    # Module scripts are refused by browsers under any other type.
    '.js': 'text/javascript; charset=utf-8',
    '.css': 'text/css; charset=utf-8',
    '.svg': 'image/svg+xml',
    '.png': 'image/png',
    '.txt': 'text/plain; charset=utf-8',
}
# Only names found in the package are served (a lookup, never a path
# joined on the file system): the pattern just keeps the route table tidy.
ASSET_PATH = r'(?P<name>\w[\w.-]{0,80}(?:/\w[\w.-]{0,80})?)'

# The throughput graph: per-minute counts over the last hour.
MINUTES = 60
STEP = 60
COUNTED = ('complete', 'failed')
PAUSED_KEY = 'paused'      # hw:<queue>:paused (issue 17's pause)
# How far ahead the next run of a periodic entry is looked for, minute by
# minute (Huey's crontab can only be asked about one minute at a time).
NEXT_HORIZON = 8 * 86400

REDIS_ERRORS = (redis.exceptions.RedisError, OSError)

INDEX_ROUTES = ['GET /console/', 'GET /activity', 'GET /periodic']


# --- static files --------------------------------------------------------------

_assets = None
_assets_lock = threading.Lock()


def assets():
    """{relative name: (bytes, content type)} of every file under assets/
    (one level of folders), read once from the installed package."""
    global _assets
    with _assets_lock:
        if _assets is None:
            found = {}
            root = importlib.resources.files(__package__) / 'assets'
            for entry in root.iterdir():
                items = entry.iterdir() if entry.is_dir() else [entry]
                for item in items:
                    if not item.is_file():
                        continue
                    name = item.name if item is entry else '%s/%s' % (
                        entry.name, item.name)
                    suffix = '.' + item.name.rpartition('.')[2]
                    kind = CONTENT_TYPES.get(suffix)
                    if kind is not None:
                        found[name] = (item.read_bytes(), kind)
            _assets = found
        return _assets


def page_response(body, content_type, status=200):
    return Response(status, body, content_type, list(SECURITY_HEADERS))


class Console:
    """The console's routes, added to a status.routes.Routes table."""

    def __init__(self, owner):
        self.owner = owner
        # Served without the token even beyond loopback: no data in them.
        self.open_handlers = (self.redirect, self.page, self.asset)

    def table(self):
        """(methods, pattern, handler, needs the token, answered at once)
        rows, as Routes.table has them before compiling."""
        return [
            (('GET',), r'/console', self.redirect, False, True),
            (('GET',), r'/console/', self.page, False, True),
            (('GET',), r'/console/assets/' + ASSET_PATH, self.asset, False,
             True),
            (('GET',), r'/activity', self.activity, False, False),
            (('GET',), r'/periodic', self.periodic, False, False),
        ]

    def redirect(self, request):
        # Relative asset URLs in the page need the trailing slash.
        return Response(308, b'', 'text/plain; charset=utf-8',
                        [('Location', '/console/')] + list(SECURITY_HEADERS))

    def _query(self, request, allowed):
        """The owner's query check, its refusal with the console's
        headers (every console response carries them); None when fine."""
        from ..routes import BadRequest
        try:
            self.owner._query(request, allowed)
        except BadRequest as exc:
            return Response.error(exc.status, exc.detail,
                                  list(SECURITY_HEADERS), **exc.extra)
        return None

    def page(self, request):
        refused = self._query(request, ())
        if refused is not None:
            return refused
        body, kind = assets()['index.html']
        return page_response(body, kind)

    def asset(self, request, name):
        refused = self._query(request, ('v',))
        if refused is not None:
            return refused
        found = assets().get(name)
        if found is None or name == 'index.html':
            return Response.error(404, 'no such console asset: %s' % name,
                                  list(SECURITY_HEADERS))
        return page_response(*found)

    def activity(self, request):
        self.owner._query(request, ())
        return Response.json(200, activity_report(self.owner.app))

    def periodic(self, request):
        self.owner._query(request, ())
        return Response.json(200, periodic_report(self.owner.app))


# --- GET /activity -------------------------------------------------------------

def activity_report(app, now=None):
    """{'start': unix time of the first minute, 'step': 60, 'minutes': 60,
    'queues': {name: {'complete': [60 counts], 'failed': [60 counts],
    'latency': seconds or None, 'paused': bool}}}.

    A count is the tasks whose record entered that end state in that
    minute and still is in it (a failed task retried since leaves the
    failed count).  The last minute is the current one, still filling.
    Cost: one write of 121 commands per queue (ZCOUNT, O(log n) each),
    and the queue heads as /metrics reads them for the latency.
    Raises REDIS_ERRORS."""
    from ..metrics import oldest_pending_ages
    now = time.time() if now is None else now
    end = periodic.minute_of(now) + STEP
    start = end - MINUTES * STEP
    storages = overview.queue_storages(app)
    commands = []
    for _, storage in storages:
        keys = storage.keys
        for state in COUNTED:
            index = keys.journal_state(state)
            for i in range(MINUTES):
                low = start + i * STEP
                commands.append(('ZCOUNT', index, low, '(%d' % (low + STEP)))
        commands.append(('EXISTS', keys.prefix + PAUSED_KEY))
    replies = iter(reads.replies(storages[0][1].pool, commands))
    queues = {}
    for name, _ in storages:
        entry = {state: [int(next(replies)) for _ in range(MINUTES)]
                 for state in COUNTED}
        entry['paused'] = bool(next(replies))
        queues[name] = entry
    try:
        ages = oldest_pending_ages(app, storages, now)
    except redis.exceptions.ResponseError as exc:
        log.warning('activity: queue latency not read: %s', exc)
        ages = None
    for name, entry in queues.items():
        entry['latency'] = None if ages is None else round(
            ages.get(name, 0.0), 3)
    return {'now': now, 'start': start, 'step': STEP, 'minutes': MINUTES,
            'queues': queues}


# --- GET /periodic -------------------------------------------------------------

_entries = {}          # id(app) -> (cfg, entries or None, error or None)
_next = {}             # (entry key, schedule) -> (next minute or None, until)
_periodic_lock = threading.Lock()


def local_entries(app):
    """(entries, error text): the periodic entries this endpoint's
    configuration declares ([periodic:NAME] and @periodic_task of the
    [tasks] modules), loaded as the scheduler loads them, once per
    configuration."""
    cfg = app.config
    with _periodic_lock:
        known = _entries.get(id(app))
        if known is not None and known[0] is cfg:
            return known[1], known[2]
    try:
        entries, error = periodic.load_entries(cfg, app), None
    except Exception as exc:   # a ConfigError, or a task module's own
        entries, error = [], str(exc)
    with _periodic_lock:
        _entries[id(app)] = (cfg, entries, error)
    return entries, error


def next_run(entry, now):
    """Start (unix time) of the next minute after `now` that `entry`'s
    schedule matches, within NEXT_HORIZON; None beyond it.  Remembered
    until that minute comes, so a poll costs nothing between runs."""
    key = (entry.key, entry.schedule)
    with _periodic_lock:
        known = _next.get(key)
    if known is not None and now < known[1]:
        return known[0]
    minute = periodic.minute_of(now) + periodic.MINUTE
    found, last = None, minute + NEXT_HORIZON
    while minute < last:
        try:
            if entry.matches(periodic.naive_utc(minute)):
                found = minute
                break
        except Exception:
            break   # a schedule that cannot be asked: no next run shown
        minute += periodic.MINUTE
    # Not found within the horizon: look again a day later.
    until = found if found is not None else now + 86400
    with _periodic_lock:
        if len(_next) > 10000:
            _next.clear()
        _next[key] = (found, until)
    return found


def _slot_time(name):
    return periodic.parse_slot_name(name)


def periodic_report(app, now=None):
    """{'queues': {name: {'scheduler': {...}, 'entries': [...],
    'next_slot', 'next_slot_at'}}, 'error': why the endpoint could not
    load its own entries, or None}.

    scheduler: leader_present, leader, host, pid, since, renewed_at,
    lease_remaining (s), last_slot / last_slot_at / last_slot_task,
    last_evaluated, slots_enqueued, delayed_moved, stopped_at: the
    leader's info (daemon/scheduler/info.py).  Each entry: key, task,
    schedule, origin (None when only the leader's info knows it),
    last_slot (ISO minute, UTC) and last_slot_at, next_slot and
    next_slot_at (None when not within 8 days, or unknown here),
    declared_here (this endpoint's configuration declares it), run_by_leader
    (the leader's info lists it).  One round trip for every queue.
    Raises REDIS_ERRORS."""
    now = time.time() if now is None else now
    storages = overview.queue_storages(app)
    commands = []
    for _, storage in storages:
        keys = storage.keys
        commands += [('GET', keys.scheduler_lease),
                     ('PTTL', keys.scheduler_lease),
                     ('GET', keys.scheduler_info)]
    replies = iter(reads.replies(storages[0][1].pool, commands))
    entries, error = local_entries(app)
    out = {}
    for index, (name, _) in enumerate(storages):
        lease, pttl, raw = next(replies), next(replies), next(replies)
        info = scheduler_info.parse(raw)
        leader = lease.decode('utf-8', 'replace') if isinstance(
            lease, bytes) else lease
        scheduler = {
            'deployed': lease is not None or raw is not None,
            'leader_present': lease is not None,
            'leader': info.get('leader') or leader,
            'lease_remaining': pttl / 1000.0 if lease and pttl and pttl > 0
            else None}
        for field in ('host', 'pid', 'since', 'renewed_at', 'last_slot',
                      'last_slot_at', 'last_slot_task', 'last_evaluated',
                      'slots_enqueued', 'delayed_moved', 'stopped_at',
                      'version'):
            scheduler[field] = info.get(field)
        led = info.get('periodic') if isinstance(info.get('periodic'),
                                                 dict) else {}
        # The endpoint's own entries belong to its [huey] queue, the first.
        mine = {e.key: e for e in entries} if index == 0 else {}
        rows = []
        for key in sorted(set(led) | set(mine)):
            entry = mine.get(key)
            known = led.get(key) if isinstance(led.get(key), dict) else {}
            when = next_run(entry, now) if entry is not None else None
            last = known.get('last_slot')
            rows.append({
                'key': key,
                'task': entry.task_name if entry else known.get('task'),
                'schedule': entry.schedule if entry else
                known.get('schedule'),
                'origin': entry.origin if entry else None,
                'last_slot': last, 'last_slot_at': _slot_time(last),
                'next_slot': None if when is None else
                periodic.slot_name(when),
                'next_slot_at': when,
                'declared_here': entry is not None,
                'run_by_leader': key in led})
        upcoming = [r['next_slot_at'] for r in rows
                    if r['next_slot_at'] is not None]
        first = min(upcoming) if upcoming else None
        out[name] = {'scheduler': scheduler, 'entries': rows,
                     'next_slot_at': first,
                     'next_slot': None if first is None else
                     periodic.slot_name(first)}
    return {'queues': out, 'error': error, 'now': now}
