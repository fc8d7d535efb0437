"""Periodic tasks: where they are declared, which minutes (slots) they
match, and enqueueing each slot exactly once.

A slot is one minute, in UTC (the shared app runs Huey with utc=True, so
crontab fields are UTC as in Huey).  Each enqueue goes with a dedupe key
`hw:<queue>:periodic:<entry>:<slot>` set NX in the same script, so a slot
reached twice -- a failover mid-minute, a restart within the minute, a
leader whose clock runs ahead (a Redis failover to a server whose clock
differs: the minute is Redis's, clock.RedisClock) -- is enqueued once.
"""
import datetime
import difflib
import inspect
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from huey import crontab
from huey.api import TaskWrapper

from ..config import ConfigError
from ..storage import PRIORITY_LUA, tag_message
from .lease import LEADER_CHECK, NOT_LEADER

log = logging.getLogger('huey_worker.scheduler')

MINUTE = 60
# Slots missed by a leader handover or a quick restart are never dropped:
# the window reaches at least this far past lease_timeout.
HANDOVER_GRACE = 10.0
# A resume point this far ahead of our clock is a clock problem, not a
# minute to wait for.
MAX_WAIT_AHEAD = 300
BATCH = 100
PASS_LIMIT = 1000   # slots enqueued per main-loop pass (a long catch-up)

# KEYS: lease, queue, priority set, its sequence, dedupe key 1..n, then
# the journal record of each slot's task 1..n.  ARGV: token, dedupe ttl
# (ms), now, the records' ttl (s; 0: the journal is off), then for each
# slot its dedupe value and its message (with the priority prefix when
# the task has a priority: storage.tag_message).  Returns the positions
# (1..n) of the slots enqueued now; a slot already done is left alone.
# The record gets its enqueue time with the push, before any worker can
# take the task (the rest comes with the enqueue signal): the wait-time
# histogram counts from it.
ENQUEUE_SLOTS = LEADER_CHECK + PRIORITY_LUA + """
local added = {}
local ranked = false
local n = (#KEYS - 4) / 2
for j = 1, n do
  local at = 5 + (j - 1) * 2
  if redis.call('SET', KEYS[4 + j], ARGV[at], 'NX', 'PX', ARGV[2]) then
    local m = ARGV[at + 1]
    local score = hw_score(m)
    if score then
      hw_enqueue(KEYS[3], KEYS[4], m, score)
      ranked = true
    else
      redis.call('LPUSH', KEYS[2], m)
    end
    if tonumber(ARGV[4]) > 0 then
      redis.call('HSETNX', KEYS[4 + n + j], 'enqueued', ARGV[3])
      redis.call('EXPIRE', KEYS[4 + n + j], ARGV[4])
    end
    added[#added + 1] = j
  end
end
if ranked then hw_mark(KEYS[2], KEYS[3]) end
return added
"""


def minute_of(ts):
    return int(ts // MINUTE) * MINUTE


def slot_name(minute):
    """'2030-01-01T12:00Z' for the minute starting at unix time `minute`."""
    return datetime.datetime.fromtimestamp(
        minute, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%MZ')


def parse_slot_name(text):
    try:
        value = datetime.datetime.strptime(text, '%Y-%m-%dT%H:%MZ')
    except (TypeError, ValueError):
        return None
    return int(value.replace(tzinfo=datetime.timezone.utc).timestamp())


def naive_utc(ts):
    """What Huey (utc=True) would call this moment: a naive UTC datetime."""
    return datetime.datetime.fromtimestamp(
        ts, datetime.timezone.utc).replace(tzinfo=None)


@dataclass
class PeriodicEntry:
    key: str                       # 'code:<task>' or 'config:<NAME>'
    task_name: str                 # registered task name
    schedule: str                  # for people: crontab text or 'code'
    matches: Callable              # naive UTC datetime -> bool
    make_task: Callable            # () -> a new task instance
    origin: str                    # where it was declared

    def __str__(self):
        return '%s (%s)' % (self.key, self.schedule)


def code_entries(app):
    """@huey.periodic_task tasks of the shared app."""
    entries = []
    for task_class in app._registry._periodic_tasks:
        name = app._registry.task_to_string(task_class)
        probe = task_class()
        entries.append(PeriodicEntry(
            key='code:%s' % name, task_name=name, schedule='code',
            matches=probe.validate_datetime, make_task=task_class,
            origin='@periodic_task in %s' % task_class.__module__))
    return entries


def _place(cfg, name, key):
    """(path, line) of one key of a [periodic:NAME] section."""
    source = cfg.periodic_sources.get(name, {}).get(key)
    detail = getattr(source, 'detail', '') or ''
    path, sep, line = detail.rpartition(':')
    if sep and line.isdigit():
        return path, int(line)
    return (detail or None), None


def _task_function(task_class):
    module = sys.modules.get(task_class.__module__)
    wrapper = getattr(module, task_class.__name__, None)
    return wrapper.func if isinstance(wrapper, TaskWrapper) else None


def _check_arguments(task_class, args, kwargs):
    """The INI's args must fit the task's signature: found at start, not
    at 2 a.m. when the slot comes."""
    func = _task_function(task_class)
    if func is None:
        return
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return
    if getattr(task_class, 'context', False):
        kwargs = dict(kwargs, task=None)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ValueError('args/kwargs do not fit %s%s: %s' % (
            func.__name__, signature, exc))


def config_entries(cfg, app):
    """[periodic:NAME] sections; an unknown task or arguments that do not
    fit it are configuration errors naming the section and line."""
    registry = app._registry
    known = sorted(registry._registry)
    entries = []
    for name, values in sorted(cfg.periodic.items()):
        section = 'periodic:%s' % name
        task_name = values['task']
        if task_name not in registry._registry:
            close = difflib.get_close_matches(task_name, known, n=1,
                                              cutoff=0.6)
            hint = ('; did you mean %r?' % close[0]) if close else \
                ('; registered tasks: %s' % (', '.join(known) or 'none'))
            path, line = _place(cfg, name, 'task')
            raise ConfigError(
                'no such task%s (tasks come from [tasks] modules)' % hint,
                section, 'task', task_name, path=path, line=line)
        task_class = registry.string_to_task(task_name)
        args, kwargs = list(values['args']), dict(values['kwargs'])
        try:
            _check_arguments(task_class, args, kwargs)
        except ValueError as exc:
            which = 'kwargs' if kwargs and not args else 'args'
            path, line = _place(cfg, name, which)
            if path is None:   # not written (the default): show the section
                path, line = _place(cfg, name, 'task')
            raise ConfigError(str(exc), section, which,
                              json.dumps(values[which]), path=path,
                              line=line)
        if not values['enabled']:
            log.info('[%s] is disabled (enabled = false)', section)
            continue
        fields = values['schedule'].split()
        path, line = _place(cfg, name, 'schedule')
        entries.append(PeriodicEntry(
            key='config:%s' % name, task_name=task_name,
            schedule=values['schedule'], matches=crontab(*fields, strict=True),
            make_task=_task_factory(task_class, args, kwargs),
            origin='[%s] in %s%s' % (section, path or '?',
                                     (':%d' % line) if line else '')))
    return entries


def _task_factory(task_class, args, kwargs):
    def make():
        return task_class(args=tuple(args), kwargs=dict(kwargs))
    return make


def load_entries(cfg, app):
    return code_entries(app) + config_entries(cfg, app)


# -- which slots are due ----------------------------------------------------

@dataclass
class Plan:
    due: list              # [(entry, minute)] in time order
    evaluated: int         # the newest minute looked at (the resume point)
    skipped_from: int = None   # first and last minute skipped as too old
    skipped_to: int = None


def plan(entries, resume, now, window, on_error=None, limit=None):
    """The slots to enqueue at wall time `now`.

    `resume` is the first minute not yet evaluated (None: nothing is known,
    start with the current minute).  The current minute is always looked
    at; earlier ones only when they lie within `window` seconds of now.
    With `limit`, a long catch-up stops after the first whole minute that
    reaches it (`evaluated` says where; the next call goes on from there),
    so one pass never holds up the lease renewal for long.
    Returns None when `resume` lies ahead of `now` (a leader whose clock
    ran ahead evaluated it already): nothing to do yet.
    """
    current = minute_of(now)
    start = current if resume is None else int(resume)
    if start > current:
        return None
    oldest = max(start, -(-int(now - window) // MINUTE) * MINUTE)
    oldest = min(oldest, current)
    result = Plan(due=[], evaluated=current)
    if oldest > start:
        result.skipped_from, result.skipped_to = start, oldest - MINUTE
    for minute in range(oldest, current + MINUTE, MINUTE):
        when = naive_utc(minute)
        for entry in entries:
            try:
                if entry.matches(when):
                    result.due.append((entry, minute))
            except Exception:
                if on_error is not None:
                    on_error(entry, minute)
        if limit is not None and len(result.due) >= limit:
            result.evaluated = minute
            break
    return result


def effective_window(cfg):
    return max(cfg.scheduler.catchup_window,
               cfg.scheduler.lease_timeout + HANDOVER_GRACE)


def dedupe_ttl(cfg):
    """Seconds a slot's dedupe key lives: past any chance of the slot being
    evaluated again."""
    return max(86400, cfg.scheduler.catchup_window + 3600)


# -- enqueueing ------------------------------------------------------------

class SlotEnqueuer:
    def __init__(self, conn, app, lease_key, dedupe_ttl_seconds):
        self.conn, self.app = conn, app
        self.lease_key = lease_key
        storage = app.storage
        self.queue_keys = [storage.queue_key, storage.priority_key,
                           storage.keys.priority_seq]
        self.prefix = app.storage.keys.prefix + 'periodic:'
        self.ttl_ms = int(dedupe_ttl_seconds * 1000)
        self._script = conn.register_script(ENQUEUE_SLOTS)

    def _record_ttl(self):
        """The journal records' time to live, 0 with the journal off."""
        cfg = self.app.config
        if cfg is None or not cfg.journal.enabled:
            return 0
        from ..journal.layout import ttl_of
        return ttl_of(self.app.storage)

    def dedupe_key(self, entry, minute):
        return '%s%s:%s' % (self.prefix, entry.key, slot_name(minute))

    def enqueue(self, token, slots, now):
        """Enqueue each (entry, minute) not enqueued before.  Returns
        ([(entry, minute, task)] enqueued now, still_leader); once Redis
        says the lease is not ours, nothing more is enqueued."""
        done = []
        for start in range(0, len(slots), BATCH):
            batch = slots[start:start + BATCH]
            tasks, keys, records = [], [], []
            args = [token, self.ttl_ms, repr(float(now)), self._record_ttl()]
            for entry, minute in batch:
                task = entry.make_task()
                if task.expires:
                    task.resolve_expires(self.app.utc)
                tasks.append(task)
                keys.append(self.dedupe_key(entry, minute))
                records.append(self.app.storage.keys.task(task.id))
                args.append(json.dumps({
                    'entry': entry.key, 'slot': slot_name(minute),
                    'task': entry.task_name, 'id': task.id, 'leader': token,
                    'at': now}))
                data = self.app.serialize_task(task)
                args.append(tag_message(data, task.priority)
                            if task.priority else data)
            reply = self._script(keys=[self.lease_key] + self.queue_keys +
                                 keys + records, args=args)
            if reply == NOT_LEADER:
                return done, False
            for position in reply:
                entry, minute = batch[position - 1]
                done.append((entry, minute, tasks[position - 1]))
        return done, True
