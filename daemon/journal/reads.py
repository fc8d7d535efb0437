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
from .layout import (ERROR_MAX_CHARS, FLOAT_FIELDS, INDEX_GROUPS, INDEX_OF,
                     INT_FIELDS, JSON_FIELDS, LOG_LENGTH, NUMBER_FIELDS,
                     RUN_PREFIX, STATES, TERMINAL, result_json,
                     result_ttl_of)
from .scripts import HELD_COUNT


def queue_name(storage):
    """The queue's name as configured ('pdf-tasks'), which records show;
    Huey's keys use it cleaned ('pdftasks')."""
    return getattr(storage, 'queue_name', storage.name)


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
        if r.get('error_traceback'):
            error['traceback'] = r['error_traceback']
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
        'revoked_reason': r.get('revoked_reason'),
        'retried': r.get('retried', 0), 'retried_at': r.get('retried_at'),
        'last_action': r.get('last_action'),
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


def unlogged_events(record):
    """The events the record's fields tell instead of the history, as the
    history would hold them, oldest first: the running of each delivery
    whose field run:<started> (the worker's label) is there (the worker
    writes it, and pushes the event only when the delivery ends other than
    for good: a retry, a requeue), and with `unlogged` 'o' the end of the
    last one, from `state`, `finished`, `duration` and `error_type`.  A
    change that ends a delivery or overwrites those fields pushes them
    first (scripts.FOLD_LUA); records of earlier layouts have no such
    fields and hold every event in the history."""
    out = []
    for name, value in record.items():
        if name.startswith(RUN_PREFIX):
            try:
                at = float(name[len(RUN_PREFIX):])
            except ValueError:
                continue
            out.append({'state': 'running', 'worker': value, 'at': at})
    out.sort(key=_time_of)
    finished = record.get('finished')
    if 'o' in (record.get('unlogged') or '') and record.get('state') and \
            isinstance(finished, float):
        event = {'state': record['state']}
        if record.get('duration') is not None:
            event['duration'] = record['duration']
        if record.get('error_type'):
            event['error'] = record['error_type']
        event['at'] = finished
        out.append(event)
    return out


def with_unlogged_events(record, history):
    """`history` with unlogged_events(record) in their places, as FOLD_LUA
    puts them when it folds them into the list: the last delivery's
    running after every event but the requests made while it ran (a
    revoke or cancel request stamped later than its start), an earlier
    delivery's (one that died unnoted) by time, the end last; then the
    last LOG_LENGTH.  Placing the last running by time alone would let
    a host whose clock runs ahead put the requeue that came before it
    after it.  One the history holds already (the same state and time:
    written by an earlier layout) is not repeated."""
    extra = unlogged_events(record)
    if not extra:
        return history
    history = list(history)
    runs = [e for e in extra if e['state'] == 'running']
    for event in extra:
        if any(e.get('state') == event['state'] and e.get('at') ==
               event['at'] for e in history):
            continue
        at = event['at']
        pos = len(history)
        if event['state'] != 'running':
            pass   # the end: last
        elif event is runs[-1]:
            while pos > 0 and _time_of(history[pos - 1]) > at and \
                    history[pos - 1].get('state') in REQUESTS:
                pos -= 1
        else:
            while pos > 0 and _time_of(history[pos - 1]) > at:
                pos -= 1
        history.insert(pos, event)
    return history[-LOG_LENGTH:]


# Events an operator's request pushes while a delivery runs.
REQUESTS = ('revoke-requested', 'cancel-requested')


def _time_of(event):
    at = event.get('at')
    return at if isinstance(at, (int, float)) else 0


def with_enqueue_event(record, history):
    """`history` with the producer's first event put back in front: its
    record says when it was enqueued (`enqueued`) but its first event is
    stored only for a task with an eta (Journal._stage_enqueue_record).
    A history that starts waiting already has it (a record of the
    first layout, the scheduler's note, a task with an eta); one cut to
    LOG_LENGTH has lost it for good."""
    enqueued = record.get('enqueued')
    if enqueued is None or len(history) >= LOG_LENGTH or (
            history and history[0].get('state') in ('pending',
                                                    'scheduled')):
        return history
    return [{'state': 'pending', 'at': enqueued}] + history


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
        record = {'id': task_id, 'queue': queue_name(storage),
                  'state': 'complete'}
        _merge_huey_result(app, storage, task_id, record, result_len, limit)
        return shape(record, [] if with_history else None)
    record = decode_record(raw)
    # Not stored since the compact layout: the key and the storage say it.
    record.setdefault('id', task_id)
    record.setdefault('queue', queue_name(storage))
    if 'result' not in record and 'result_omitted' not in record \
            and result_len and record.get('state') == 'complete':
        _merge_huey_result(app, storage, task_id, record, result_len, limit)
    return shape(record, with_enqueue_event(
        record, with_unlogged_events(record, _decode_history(history)))
        if with_history else None)


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
    """The tasks whose state changed last, newest first: find_tasks'
    first page (at most `limit` records, `scan_max` index entries looked
    at)."""
    return find_tasks(app, storage, state=state, limit=limit,
                      scan_max=scan_max)[0]


WINDOW_FIELDS = ('updated', 'enqueued', 'started', 'finished')


class BadCursor(ValueError):
    """A paging cursor that find_tasks did not hand out."""


def _cursor_text(driver, score, skip):
    return '%s:%r:%d' % (driver, score, skip)


def _parse_cursor(cursor):
    """(driver: 's', 'n' or 'a', score, skip) of a cursor find_tasks made."""
    try:
        driver, score, skip = cursor.split(':')
        score, skip = float(score), int(skip)
    except (AttributeError, ValueError):
        driver = None
    if driver not in ('s', 'n', 'a') or skip < 0 or score != score:
        raise BadCursor('bad cursor %r (pass back the next_cursor of the '
                        'page before)' % (cursor,))
    return driver, score, skip


def find_tasks(app, storage, state=None, name=None, since=None, until=None,
               field='updated', limit=50, cursor=None, scan_max=5000):
    """Tasks still in retention, newest first, with a cursor for paging.

    `state`: one of layout.STATES; `name`: a task name as registered
    (module.function); `since`/`until`: epoch seconds bounding the
    record's `field` (WINDOW_FIELDS), either may be None.  The order is
    the time of each task's last state change, or with `name` alone the
    time it was enqueued.  One call looks at `limit` records at most and
    `scan_max` index entries at most: a page may hold fewer than `limit`
    tasks with a cursor to go on; the cursor is None at the end.

    Returns (shaped records without history, next cursor or None).
    Raises ValueError (BadCursor) for a bad state, field or cursor."""
    if state is not None and state not in STATES:
        raise ValueError('unknown state %r (one of %s)' % (
            state, ', '.join(STATES)))
    if field not in WINDOW_FIELDS:
        raise ValueError('unknown time field %r (one of %s)' % (
            field, ', '.join(WINDOW_FIELDS)))
    limit = max(1, min(int(limit), 1000))
    keys = storage.keys
    conn = storage.conn
    parsed = None if cursor is None else _parse_cursor(cursor)
    # The index walked: the state's, or with a name too whichever is
    # smaller (kept across the pages of one listing by the cursor).
    if state is not None and name is not None:
        driver = parsed[0] if parsed else (
            'n' if conn.zcard(keys.journal_name(name)) < conn.zcard(
                keys.journal_state(INDEX_OF[state])) else 's')
    else:
        driver = 's' if state is not None else 'n' if name is not None \
            else 'a'
    if parsed and parsed[0] != driver:
        raise BadCursor('the cursor %r belongs to a listing with other '
                        'filters' % cursor)
    if driver == 's':
        indexes = [keys.journal_state(INDEX_OF[state])]
    elif driver == 'n':
        indexes = [keys.journal_name(name)]
    else:
        # Every task is in exactly one state index: their merge is every
        # record in retention, by its last state change.
        indexes = [keys.journal_state(group) for group in INDEX_GROUPS]
    # An index scored by the time the window is about narrows the range
    # read (padded: its score and the record's field are two clock reads).
    low, high = '-inf', float('inf')
    if driver == 'n':
        exact = field == 'enqueued'
    else:
        exact = (state in TERMINAL and field == 'finished') or \
            (state == 'running' and field == 'started')
    if exact:
        if since is not None:
            low = since - 1.0
        if until is not None:
            high = until + 1.0
    top, skip = (high, 0) if parsed is None else parsed[1:]
    top = min(top, high)
    found, looked = [], 0
    page = max(limit, 100)
    while looked < scan_max:
        want = page + skip
        entries = _index_page(conn, indexes, top, low, want)
        # The first `skip` entries at exactly `top` came on earlier pages
        # (ties are ordered by id, so always the same ones).
        seen = 0
        while seen < min(skip, len(entries)) and entries[seen][1] == top:
            seen += 1
        fresh = entries[seen:]
        if not fresh:
            return found, None
        records = _records(conn, keys, [task_id for task_id, _ in fresh])
        for (task_id, score), raw in zip(fresh, records):
            looked += 1
            if score == top:
                skip += 1
            else:
                top, skip = score, 1
            if raw:
                record = decode_record(raw)
                record.setdefault('id', task_id)
                record.setdefault('queue', queue_name(storage))
                if _matches(record, state, name, since, until, field):
                    found.append(shape(record))
            if len(found) >= limit or looked >= scan_max:
                return found, _cursor_text(driver, top, skip)
        if len(entries) < want:
            return found, None   # the whole index was read
    return found, _cursor_text(driver, top, skip)


def _index_page(conn, indexes, top, low, count):
    """(id, score) of up to `count` entries at or below `top`, newest first
    (ties: by id, descending), over the merge of `indexes`."""
    pipe = conn.pipeline(transaction=False)
    high = '+inf' if top == float('inf') else repr(top)
    for index in indexes:
        pipe.zrevrangebyscore(index, high, low, start=0, num=count,
                              withscores=True)
    merged = [(member.decode(), score) for reply in pipe.execute()
              for member, score in reply]
    merged.sort(key=lambda e: (e[1], e[0]), reverse=True)
    return merged[:count]


def _records(conn, keys, ids):
    pipe = conn.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(keys.task(task_id))
    return pipe.execute()


def _matches(record, state, name, since, until, field):
    if state is not None and record.get('state') != state:
        return False
    if name is not None and record.get('name') != name:
        return False
    if since is None and until is None:
        return True
    value = record.get(field)
    if value is None:
        return False
    return (since is None or value >= since) and \
        (until is None or value <= until)


def results_held_command(storage, now=None):
    """One command (for batching with others) whose reply is how many
    results Huey holds, by the journal's count: results of the last [huey]
    result_timeout, counted by the hour they were stored (the oldest hour
    in proportion), and what the first layout's index still holds."""
    now = time.time() if now is None else now
    keys = storage.keys
    return ('EVAL', HELD_COUNT, 2, keys.journal_held, keys.journal_results,
            repr(now), result_ttl_of(storage))


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
    durations hash (or the waits hash): the sum in seconds, kept in whole
    microseconds (`sum_us`: HINCRBY costs Redis a third of HINCRBYFLOAT,
    and a task sends two) plus what the float field of earlier versions
    (`sum`) holds."""
    out = {}
    for name, part, value in _metric_fields(raw):
        entry = out.setdefault(name, {'buckets': {}, 'count': 0, 'sum': 0.0})
        if part == 'sum_us':
            entry['sum'] += int(value) / 1e6
        elif part == 'sum':
            entry['sum'] += float(value)
        else:
            entry['buckets'][float(part)] = int(value)
            entry['count'] += int(value)
    return out


def is_terminal(state):
    return state in TERMINAL
