"""Reading the journal, for the status endpoint and the CLI alike: one
task's record (never deleting anything), recent tasks from the index, and
the counters behind /metrics."""
import json
import os
import threading
import time

from huey.utils import Error
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .. import transaction
from .layout import (ERROR_MAX_CHARS, FLOAT_FIELDS, INT_FIELDS, JSON_FIELDS,
                     NUMBER_FIELDS, TERMINAL, result_json, ttl_of)


def _decode_number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _decode_float(text):
    try:
        return float(text)
    except ValueError:
        return None


def _decode_int(text):
    try:
        return int(float(text))
    except ValueError:
        return None


def _decode_json(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


# Field name -> decoder; the first set listed wins for a name in several.
_DECODERS = {}
for _fields, _decoder in ((JSON_FIELDS, _decode_json),
                          (NUMBER_FIELDS, _decode_number),
                          (INT_FIELDS, _decode_int),
                          (FLOAT_FIELDS, _decode_float)):
    _DECODERS.update(dict.fromkeys(_fields, _decoder))
del _fields, _decoder


def decode_record(raw):
    """Redis hash (bytes) -> typed dict."""
    out = {}
    decoder_of = _DECODERS.get
    for key, value in raw.items():
        if type(key) is bytes:
            key = key.decode()
        if type(value) is bytes:
            value = value.decode('utf-8', 'replace')
        decoder = decoder_of(key)
        out[key] = value if decoder is None else decoder(value)
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
        'enqueued': r.get('enqueued'),
        'first_seen': r.get('first_seen'),
        'first_seen_in': r.get('first_seen_in'),
        'started': r.get('started'),
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
    """Oldest first, in the order Redis took the events: the order things
    happened.  Never sorted by their `at`, which comes from the clock of
    whichever host wrote them (a few milliseconds of skew would put a
    complete before its running); writers put each event in its place
    (the loss of a delivery found at the next one: Journal.on_started)."""
    try:
        # One parse for the whole list; item by item if any is bad.
        events = json.loads(b'[' + b','.join(items) + b']' if items and
                            type(items[0]) is bytes else
                            '[' + ','.join(items) + ']')
    except (ValueError, TypeError):
        events = None
    if events is None or len(events) != len(items):
        events = []
        for item in items:
            try:
                events.append(json.loads(item))
            except ValueError:
                continue
    return [event for event in events if isinstance(event, dict)]


def read_task(app, storage, task_id, with_history=True):
    """The shaped record of `task_id`, or None.  Never deletes anything:
    Huey's result is only looked at (STRLEN, then GET when small) for
    tasks the journal has no copy of."""
    keys = storage.keys
    raw, history, result_len = replies(storage.pool, (
        ('HGETALL', keys.task(task_id)),
        ('LRANGE', keys.task_log(task_id), 0, -1),
        ('STRLEN', storage.result_key(task_id))))
    raw = as_dict(raw)
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


# -- one connection per reading thread ------------------------------------

class _Own(threading.local):
    conn = pool = None


_own = _Own()


def _forget_after_fork():
    # The parent's socket is not ours to use or close.
    _own.conn = _own.pool = None


os.register_at_fork(after_in_child=_forget_after_fork)


def _drop(broken):
    conn, pool = _own.conn, _own.pool
    _own.conn = _own.pool = None
    if conn is not None:
        if broken:
            conn.disconnect()
        pool.release(conn)


def replies(pool, commands):
    """The raw replies of `commands` (tuples), sent in one write on this
    thread's own connection from `pool`.

    Why not a redis-py pipeline: for the three reads of one task, the
    pipeline's Python (command stack, pool checkout with its lock, pid
    check and readiness poll, per-reply callbacks) cost three times the
    round trip itself, and the status endpoint's handler threads do little
    else.  Reads only, so a connection found dead after sitting idle
    (Redis restarted) is replaced and the commands sent again, once."""
    for attempt in (0, 1):
        reused = _own.conn is not None and _own.pool is pool
        if not reused:
            _drop(False)
            _own.conn, _own.pool = pool.get_connection(), pool
        conn = _own.conn
        try:
            conn.send_packed_command(transaction.pack(conn, commands))
            out, error = [], None
            for _ in commands:
                # Every reply is read even after an error reply, so the
                # connection stays in step.
                try:
                    out.append(conn.read_response())
                except ResponseError as exc:
                    error = error or exc
                    out.append(exc)
        except (RedisConnectionError, OSError):
            _drop(True)
            if reused and not attempt:
                continue
            raise
        except BaseException:
            _drop(True)   # a timeout or worse: the replies are out of step
            raise
        if error is not None:
            raise error
        return out


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


def results_held_command(storage, now=None):
    now = time.time() if now is None else now
    return ('ZCOUNT', storage.keys.journal_results, now - ttl_of(storage),
            '+inf')


def as_dict(raw):
    """HGETALL's reply as a dict, from RESP2 (flat) or RESP3."""
    if isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2]))


def _metric_fields(raw):
    """(task name, part, value) for each field of a metrics hash (HGETALL's
    reply): the fields are 'NAME<tab>PART'."""
    for field, value in as_dict(raw).items():
        if isinstance(field, bytes):
            field = field.decode()
        name, _, part = field.rpartition('\t')
        yield name, part, value


def parse_outcome_counts(raw):
    """{(task name, state): count} from the outcomes hash."""
    return {(name, state): int(value)
            for name, state, value in _metric_fields(raw)}


def parse_duration_stats(raw):
    """{task name: {'buckets': {le: count}, 'count': n, 'sum': s}} from the
    durations hash."""
    out = {}
    for name, part, value in _metric_fields(raw):
        entry = out.setdefault(name, {'buckets': {}, 'count': 0, 'sum': 0.0})
        if part == 'sum':
            entry['sum'] = float(value)
        else:
            entry['buckets'][float(part)] = int(value)
            entry['count'] += int(value)
    return out


def is_terminal(state):
    return state in TERMINAL
