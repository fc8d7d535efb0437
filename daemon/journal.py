"""The task journal: every task's life, recorded in Redis under the suite's
own keys (never in Huey's result store), read by the status endpoint and
the operator CLI.

Layout (hw:<queue>: prefix, see daemon/keys.py):
  task:<id>       hash, the record: state, name, args summary, times,
                  attempt, retries, worker, progress, metadata, error, result
  task-log:<id>   list, the last LOG_LENGTH state changes (JSON)
  journal:recent  zset id -> time of last change (listings; capped)
  journal:results zset id -> finish time of tasks whose result Huey holds
  metrics:*       hashes of per-task-name counters for /metrics
Every record and log expires [huey] result_timeout after its last change,
and the indexes are trimmed to the same window, so nothing grows without
bound.

Writers:
  producer  Huey's SIGNAL_ENQUEUED: pending (scheduled with a future eta);
            staged, so it rides the LPUSH of the enqueue itself.
  worker    daemon.hooks: on_dequeued -> running; on_outcome -> complete,
            failed, retrying, revoked, expired, canceled, scheduled;
            on_requeued -> lost / interrupted, then pending; on_dead_letter
            -> failed.  Staged, so they ride the worker's own round trips.
  Huey's post_execute hook hands over what the hooks lack (the return
  value and the exception).
Each change is a fixed handful of commands (HSET, EXPIRE, RPUSH, LTRIM,
ZADD...): O(1) per change, no KEYS anywhere.

The in-task API lives in daemon/progress.py and is re-exported here.
"""
import datetime
import json
import logging
import threading
import time

from huey import signals as S
from huey.utils import Error

from . import hooks, progress
from .progress import (  # noqa: F401  the public in-task API
    current_delivery, current_task_id, report_progress, sensitive)

log = logging.getLogger('huey_worker.journal')

STATES = ('pending', 'scheduled', 'running', 'retrying', 'complete',
          'failed', 'revoked', 'expired', 'canceled', 'interrupted', 'lost')
TERMINAL = frozenset(('complete', 'failed', 'revoked', 'expired',
                      'canceled'))
# Outcomes after which the task ran its body (they have a duration).
EXECUTED = frozenset(('complete', 'failed', 'retrying'))

LOG_LENGTH = 50
ERROR_MAX_CHARS = 2000
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    900.0, 3600.0, float('inf'))

_FLOAT_FIELDS = frozenset((
    'enqueued', 'started', 'finished', 'updated', 'eta', 'next_retry',
    'duration', 'expires', 'requeued_at', 'progress_at', 'revoke_requested'))
_INT_FIELDS = frozenset(('pid', 'worker', 'attempt', 'retries_total',
                         'retries_left', 'requeues'))
_NUMBER_FIELDS = frozenset(('progress_current', 'progress_total'))
_JSON_FIELDS = frozenset(('metadata', 'result'))


# --- small encoders ----------------------------------------------------------

def _text(value):
    if isinstance(value, bool):
        return '1' if value else '0'
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _epoch(value):
    """Huey's naive UTC datetimes (utc=True) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    return float(value)


def _clip(value, budget, depth=0):
    """A JSON-safe copy of `value` that stays near `budget` characters:
    long strings and containers are cut before anything is encoded, so a
    huge argument costs no more than a small one."""
    if depth > 6:
        return '...'
    if isinstance(value, (str, bytes)):
        if isinstance(value, bytes):
            value = value[:budget].decode('utf-8', 'replace')
        return value if len(value) <= budget else value[:budget] + '...'
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        out = {}
        for i, (key, item) in enumerate(value.items()):
            if i >= 50 or budget <= 0:
                out['...'] = '%d more' % (len(value) - i)
                break
            out[str(key)[:100]] = _clip(item, budget, depth + 1)
            budget -= len(str(key)) + 8
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value) if not isinstance(value, (list, tuple)) else value
        out = []
        for i, item in enumerate(items):
            if i >= 100 or budget <= 0:
                out.append('... %d more' % (len(items) - i))
                break
            out.append(_clip(item, budget, depth + 1))
            budget -= 8
        return out
    text = repr(value)
    return text if len(text) <= budget else text[:budget] + '...'


def args_summary(task, limit):
    """(summary text or None, sensitive flag)."""
    hidden = progress.sensitivity(task)
    if hidden is True:
        return None, True
    if limit <= 0:
        return None, False
    kwargs = dict(task.kwargs or {})
    kwargs.pop('task', None)   # a context task's own instance
    for name in hidden or ():
        if name in kwargs:
            kwargs[name] = '********'
    summary = {'args': _clip(list(task.args or ()), limit),
               'kwargs': _clip(kwargs, limit)}
    text = json.dumps(summary, default=repr, sort_keys=True)
    if len(text) > limit:
        text = text[:limit] + '...'
    return text, bool(hidden)


def result_json(value, limit):
    """(JSON text, None) or (None, why it is not kept in the journal)."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError) as exc:
        return None, 'not representable as JSON (%s)' % exc
    if len(text) > limit:
        return None, ('%d bytes as JSON, more than [journal] '
                      'result_max_bytes (%d)' % (len(text), limit))
    return text, None


def _error_fields(exc):
    message = str(exc)
    return {'error_type': type(exc).__name__,
            'error_message': message[:ERROR_MAX_CHARS]}


# --- the writer ----------------------------------------------------------------

class Journal:
    """The journal of one Huey app: its Huey receivers and delivery hooks."""

    def __init__(self, app):
        self.app = app
        self._stash = threading.local()

    # settings, read at each call so a reconfigured app is followed

    def _cfg(self):
        return self.app.config

    def _active(self, storage):
        cfg = self._cfg()
        return (cfg is not None and cfg.journal.enabled
                and hasattr(storage, 'stage') and hasattr(storage, 'keys'))

    def task_name(self, task):
        return self.app._registry.task_to_string(type(task))

    @staticmethod
    def _ttl(storage):
        return int(getattr(storage, '_expire_time', 604800))

    def _stage_change(self, storage, task_id, fields, event, drop=(),
                      setnx=None, incr=None, extra=None):
        """Stage one state change of `task_id`: a fixed set of commands."""
        keys = storage.keys
        key, log_key = keys.task(task_id), keys.task_log(task_id)
        now = time.time()
        mapping = {k: _text(v) for k, v in fields.items() if v is not None}
        mapping['updated'] = _text(now)
        event = dict(event, at=now)
        event_text = json.dumps(event, default=repr, sort_keys=True)
        ttl = self._ttl(storage)

        def write(pipe):
            if drop:
                pipe.hdel(key, *drop)
            for field, value in (setnx or {}).items():
                pipe.hsetnx(key, field, _text(value))
            for field, amount in (incr or {}).items():
                pipe.hincrby(key, field, amount)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl)
            pipe.rpush(log_key, event_text)
            pipe.ltrim(log_key, -LOG_LENGTH, -1)
            pipe.expire(log_key, ttl)
            pipe.zadd(keys.journal_recent, {task_id: now})
            if extra is not None:
                extra(pipe)
        storage.stage(write)

    @staticmethod
    def _round_trip_follows():
        """Staged commands ride the worker's round trips.  A hook called
        where none follows (the consumer's main thread recovering a dead
        worker's tasks) sends them itself: that thread runs no task."""
        return progress.current() is not None

    # producer: SIGNAL_ENQUEUED

    def on_enqueued(self, signal, task, *args, **kwargs):
        storage = self.app.storage   # configures a producer's app on first use
        if not self._active(storage):
            return
        if progress.current_task_id() == task.id:
            return  # the worker re-enqueues a retry: on_outcome records it
        cfg = self._cfg()
        now = time.time()
        eta = _epoch(task.eta)
        state = 'scheduled' if eta is not None and eta > now else 'pending'
        args_text, hidden = args_summary(task, cfg.journal.args_max_bytes)
        fields = {'id': task.id, 'name': self.task_name(task),
                  'queue': self.app.name, 'state': state,
                  'retries_left': task.retries, 'eta': eta,
                  'expires': _epoch(task.expires_resolved),
                  'args': args_text, 'args_sensitive': hidden or None}
        # The same id enqueued again (a scheduled task moved to the queue
        # when due) keeps its first enqueue time and retry budget.
        self._stage_change(storage, task.id, fields,
                           {'state': state, **({'eta': eta} if eta else {})},
                           setnx={'enqueued': now,
                                  'retries_total': task.retries})

    # worker: Huey's post_execute (value and exception of the body)

    def after_execute(self, task, value, exception):
        self._stash.outcome = (task.id, value, exception)

    def _take_outcome(self, task_id):
        outcome = getattr(self._stash, 'outcome', None)
        self._stash.outcome = None
        if outcome is None or outcome[0] != task_id:
            return None, None, False
        return outcome[1], outcome[2], True

    # worker: delivery hooks

    def on_dequeued(self, storage, task, worker_info):
        if not self._active(storage):
            return
        cfg = self._cfg()
        name = self.task_name(task)
        progress.enter(progress.TaskContext(
            storage, task.id, name, cfg.journal.progress_interval))
        self._stash.outcome = None
        eta = _epoch(task.eta)
        if eta is not None and eta > time.time():
            return  # not due: Huey moves it to the schedule (outcome below)
        args_text, hidden = args_summary(task, cfg.journal.args_max_bytes)
        fields = {'state': 'running', 'started': time.time(),
                  'retries_left': task.retries,
                  'host': worker_info.get('host'),
                  'pid': worker_info.get('pid'),
                  'consumer': worker_info.get('consumer'),
                  'worker': worker_info.get('worker')}
        # A record enqueued by a producer without the journal gets the
        # basics here; an existing one keeps them.
        setnx = {'id': task.id, 'name': name, 'queue': self.app.name,
                 'enqueued': time.time(), 'retries_total': task.retries}
        if args_text is not None:
            setnx['args'] = args_text
        if hidden:
            setnx['args_sensitive'] = True
        self._stage_change(
            storage, task.id, fields,
            {'state': 'running', 'worker': '%s:%s/%s' % (
                fields['host'], fields['pid'], fields['worker'])},
            drop=progress.PROGRESS_FIELDS + ('finished', 'next_retry',
                                             'duration'),
            setnx=setnx, incr={'attempt': 1})

    def on_outcome(self, storage, task, state, duration):
        if not self._active(storage):
            progress.leave(task.id)
            return
        cfg = self._cfg()
        name = self.task_name(task)
        value, exception, ran = self._take_outcome(task.id)
        if state == 'complete' and exception is not None:
            state = 'failed'   # a time-out or similar the worker called done
        now = time.time()
        fields = {'state': state, 'retries_left': task.retries}
        drop = []
        event = {'state': state}
        if ran or state in EXECUTED:
            fields['duration'] = round(duration, 6)
            event['duration'] = round(duration, 6)
        if state in TERMINAL:
            fields['finished'] = now
        if state in ('retrying', 'scheduled'):
            eta = _epoch(task.eta) or now
            fields['next_retry' if state == 'retrying' else 'eta'] = eta
            event['eta'] = eta
        if exception is not None:
            fields.update(_error_fields(exception))
            event['error'] = fields['error_type']
        result_stored = False
        if state == 'complete':
            drop += ['error_type', 'error_message']
            result_stored = value is not None or self.app.store_none
            if ran and result_stored:
                text, why = result_json(value, cfg.journal.result_max_bytes)
                if text is not None:
                    fields['result'] = text
                else:
                    fields['result_omitted'] = why
        elif state == 'failed':
            result_stored = self.app.results   # Huey stores the error
        ctx = progress.leave(task.id)
        if ctx is not None and ctx.dirty:
            fields.update(ctx.progress_fields())
        keys, ttl = storage.keys, self._ttl(storage)
        index_max = cfg.journal.index_max

        def account(pipe):
            if result_stored:
                pipe.zadd(keys.journal_results, {task.id: now})
                pipe.zremrangebyscore(keys.journal_results, '-inf', now - ttl)
            pipe.zremrangebyscore(keys.journal_recent, '-inf', now - ttl)
            pipe.zremrangebyrank(keys.journal_recent, 0, -index_max - 1)
            self._count(pipe, keys, name, state,
                        duration if 'duration' in fields else None)
        self._stage_change(storage, task.id, fields, event, drop=drop,
                           extra=account)

    @staticmethod
    def _count(pipe, keys, name, state, duration):
        if state == 'scheduled':
            return   # not due yet: no outcome to count
        pipe.hincrby(keys.metrics_outcomes, '%s\t%s' % (name, state), 1)
        if duration is None:
            return
        bucket = next(b for b in DURATION_BUCKETS if duration <= b)
        pipe.hincrby(keys.metrics_durations, '%s\t%r' % (name, bucket), 1)
        pipe.hincrby(keys.metrics_durations, '%s\tcount' % name, 1)
        pipe.hincrbyfloat(keys.metrics_durations, '%s\tsum' % name,
                          round(duration, 6))

    def on_requeued(self, storage, messages, reason):
        if not self._active(storage):
            return
        rides = self._round_trip_follows()
        staged = False
        for raw in messages:
            try:
                task = self.app.deserialize_task(raw)
            except Exception:
                continue   # the worker sets undecodable messages aside
            name = self.task_name(task)
            ctx = progress.leave(task.id)
            fields = {'state': 'pending', 'requeued_reason': reason,
                      'requeued_at': time.time()}
            if ctx is not None and ctx.dirty:
                fields.update(ctx.progress_fields())
            keys = storage.keys
            # Two history entries: what happened, then where it is now.
            self._stage_change(storage, task.id, {'state': reason},
                               {'state': reason})
            self._stage_change(
                storage, task.id, fields, {'state': 'pending'},
                incr={'requeues': 1},
                extra=lambda pipe, n=name: pipe.hincrby(
                    keys.metrics_outcomes, '%s\t%s' % (n, reason), 1))
            staged = True
        if staged and not rides:
            storage.flush()

    def on_dead_letter(self, storage, record):
        task_id = record.get('task_id')
        if not task_id or not self._active(storage):
            return
        rides = self._round_trip_follows()
        progress.leave(task_id)
        name = record.get('task_name') or ''
        keys = storage.keys
        fields = {'state': 'failed', 'finished': time.time(),
                  'error_type': 'DeadLetter',
                  'error_message': ('%s: %s' % (record.get('reason'),
                                                record.get('detail')))[
                                                    :ERROR_MAX_CHARS],
                  'dead_letter': record.get('reason')}
        self._stage_change(
            storage, task_id, fields,
            {'state': 'failed', 'dead_letter': record.get('reason')},
            extra=lambda pipe: pipe.hincrby(
                keys.metrics_outcomes, '%s\tfailed' % name, 1)
            if name else None)
        if not rides:
            storage.flush()

    # producer: a revoke requested through the endpoint or CLI

    def stage_revoke_requested(self, storage, task_id):
        self._stage_change(storage, task_id, {'revoke_requested': time.time()},
                           {'state': 'revoke-requested'})


_journals = {}


def install(app):
    """Record the life of every task of `app` (idempotent).  Called for the
    shared app when daemon.app is imported; [journal] enabled switches it."""
    journal = _journals.get(id(app))
    if journal is not None:
        return journal
    journal = _journals[id(app)] = Journal(app)
    app._signal.connect(journal.on_enqueued, S.SIGNAL_ENQUEUED)
    app.post_execute('huey_worker.journal')(journal.after_execute)
    hooks.on_dequeued.append(journal.on_dequeued)
    hooks.on_outcome.append(journal.on_outcome)
    hooks.on_requeued.append(journal.on_requeued)
    hooks.on_dead_letter.append(journal.on_dead_letter)
    return journal


# --- reads (shared by the status endpoint and the CLI) -------------------------

def _decode_number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def decode_record(raw):
    """Redis hash (bytes) -> typed dict."""
    out = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode('utf-8', 'replace') if isinstance(
            value, bytes) else value
        if key in _FLOAT_FIELDS:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = None
        elif key in _INT_FIELDS:
            try:
                out[key] = int(float(value))
            except ValueError:
                out[key] = None
        elif key in _NUMBER_FIELDS:
            out[key] = _decode_number(value)
        elif key in _JSON_FIELDS:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


def shape(record, history=None):
    """The record as the endpoint and CLI show it."""
    r = record
    args = None
    args_truncated = False
    if r.get('args') is not None:
        try:
            args = json.loads(r['args'])
        except ValueError:
            args, args_truncated = r['args'], True
    prog = None
    if r.get('progress_current') is not None:
        total = r.get('progress_total')
        current = r['progress_current']
        prog = {'current': current, 'total': total,
                'percent': round(100.0 * current / total, 1)
                if isinstance(total, (int, float)) and total > 0
                and isinstance(current, (int, float)) else None,
                'message': r.get('progress_message'),
                'updated': r.get('progress_at')}
    worker = None
    if r.get('host') is not None or r.get('consumer') is not None:
        worker = {'host': r.get('host'), 'pid': r.get('pid'),
                  'consumer': r.get('consumer'), 'worker': r.get('worker')}
    error = None
    if r.get('error_type'):
        error = {'type': r['error_type'], 'message': r.get('error_message'),
                 'dead_letter': r.get('dead_letter')}
    out = {
        'id': r.get('id'), 'name': r.get('name'), 'queue': r.get('queue'),
        'state': r.get('state'), 'terminal': r.get('state') in TERMINAL,
        'args': args, 'args_sensitive': r.get('args_sensitive') == '1',
        'args_truncated': args_truncated,
        'enqueued': r.get('enqueued'), 'started': r.get('started'),
        'finished': r.get('finished'), 'updated': r.get('updated'),
        'duration': r.get('duration'), 'eta': r.get('eta'),
        'expires': r.get('expires'),
        'attempt': r.get('attempt', 0), 'retries_left': r.get('retries_left'),
        'retries_total': r.get('retries_total'),
        'next_retry': r.get('next_retry'), 'requeues': r.get('requeues', 0),
        'requeued_reason': r.get('requeued_reason'),
        'revoke_requested': r.get('revoke_requested'),
        'worker': worker, 'progress': prog,
        'metadata': r.get('metadata') or {}, 'error': error,
        'result': r.get('result'),
    }
    if r.get('result_omitted'):
        out['result_omitted'] = r['result_omitted']
    if history is not None:
        out['history'] = history
    return out


def _decode_history(items):
    out = []
    for item in items:
        try:
            out.append(json.loads(item))
        except ValueError:
            continue
    return out


def read_task(app, storage, task_id, with_history=True):
    """The shaped record of `task_id`, or None.  Never deletes anything:
    Huey's result is only looked at (STRLEN, then GET when small) for
    tasks the journal has no copy of."""
    keys = storage.keys
    pipe = storage.conn.pipeline(transaction=False)
    pipe.hgetall(keys.task(task_id))
    pipe.lrange(keys.task_log(task_id), 0, -1)
    pipe.strlen(storage.result_key(task_id))
    raw, history, result_len = pipe.execute()
    limit = app.config.journal.result_max_bytes if app.config else 65536
    if not raw:
        if not result_len:
            return None
        # Journal off when it ran, or its record expired first: Huey's
        # result is all there is.
        record = {'id': task_id, 'state': 'complete'}
        _merge_huey_result(app, storage, task_id, record, result_len, limit)
        return shape(record, [] if with_history else None)
    record = decode_record(raw)
    record.setdefault('id', task_id)
    if 'result' not in record and 'result_omitted' not in record \
            and result_len and record.get('state') == 'complete':
        _merge_huey_result(app, storage, task_id, record, result_len, limit)
    return shape(record, _decode_history(history) if with_history else None)


def _merge_huey_result(app, storage, task_id, record, size, limit):
    if size > limit:
        record['result_omitted'] = ('%d bytes in Huey\'s result store, more '
                                    'than [journal] result_max_bytes (%d)'
                                    % (size, limit))
        return
    data = storage.conn.get(storage.result_key(task_id))
    if data is None:
        return
    try:
        value = app.serializer.deserialize(data)
    except Exception as exc:
        record['result_omitted'] = 'cannot decode Huey\'s result: %s' % exc
        return
    if isinstance(value, Error):
        record['state'] = 'failed'
        meta = value.metadata or {}
        record['error_type'] = 'Error'
        record['error_message'] = str(meta.get('error'))[:ERROR_MAX_CHARS]
        return
    text, why = result_json(value, limit)
    if text is not None:
        record['result'] = json.loads(text)
    else:
        record['result_omitted'] = why


def list_tasks(app, storage, limit=50, state=None, scan_max=5000):
    """The most recently changed tasks, newest first (bounded: at most
    `limit` records, and with a state filter at most `scan_max` index
    entries looked at)."""
    keys = storage.keys
    limit = max(1, min(int(limit), 1000))
    found, start, page = [], 0, max(limit, 100)
    while len(found) < limit and start < scan_max:
        ids = storage.conn.zrevrange(keys.journal_recent, start,
                                     start + page - 1)
        if not ids:
            break
        pipe = storage.conn.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(keys.task(task_id.decode()))
        for task_id, raw in zip(ids, pipe.execute()):
            if not raw:
                continue
            record = decode_record(raw)
            record.setdefault('id', task_id.decode())
            if state is None or record.get('state') == state:
                found.append(shape(record))
                if len(found) >= limit:
                    break
        start += page
    return found


def results_held(storage, now=None):
    now = time.time() if now is None else now
    return storage.conn.zcount(storage.keys.journal_results,
                               now - Journal._ttl(storage), '+inf')


def outcome_counts(storage):
    """{(task name, state): count} from the metrics hash."""
    out = {}
    for field, value in storage.conn.hgetall(
            storage.keys.metrics_outcomes).items():
        name, _, state = field.decode().rpartition('\t')
        out[(name, state)] = int(value)
    return out


def duration_stats(storage):
    """{task name: {'buckets': {le: count}, 'count': n, 'sum': s}}."""
    out = {}
    for field, value in storage.conn.hgetall(
            storage.keys.metrics_durations).items():
        name, _, part = field.decode().rpartition('\t')
        entry = out.setdefault(name, {'buckets': {}, 'count': 0, 'sum': 0.0})
        if part == 'count':
            entry['count'] = int(value)
        elif part == 'sum':
            entry['sum'] = float(value)
        else:
            entry['buckets'][float(part)] = int(value)
    return out


def is_terminal(state):
    return state in TERMINAL


__all__ = ['report_progress', 'current_delivery', 'current_task_id',
           'sensitive', 'install', 'read_task', 'list_tasks', 'STATES',
           'TERMINAL']
