"""Reading the journal, for the status endpoint and the CLI alike: one
task's record (never deleting anything), recent tasks from the index, and
the counters behind /metrics."""
import json
import time

from huey.utils import Error

from .layout import (ERROR_MAX_CHARS, FLOAT_FIELDS, INT_FIELDS, JSON_FIELDS,
                     NUMBER_FIELDS, TERMINAL, result_json, ttl_of)


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
        if key in FLOAT_FIELDS:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = None
        elif key in INT_FIELDS:
            try:
                out[key] = int(float(value))
            except ValueError:
                out[key] = None
        elif key in NUMBER_FIELDS:
            out[key] = _decode_number(value)
        elif key in JSON_FIELDS:
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
    """Oldest first, by time: writers on different hosts may append
    slightly out of order."""
    out = []
    for item in items:
        try:
            event = json.loads(item)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    out.sort(key=lambda e: e.get('at') or 0)
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
                               now - ttl_of(storage), '+inf')


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
        if part == 'sum':
            entry['sum'] = float(value)
        else:
            entry['buckets'][float(part)] = int(value)
            entry['count'] += int(value)
    return out


def is_terminal(state):
    return state in TERMINAL
