"""The dead-letter list: messages set aside instead of run (bad signature,
unknown task, undecodable, poison).  Listing, requeueing and purging, for
the CLI and the status endpoint.  Each record keeps the original message,
so nothing set aside is lost until an operator purges it."""
import base64
import json

# KEYS: dead list, queue, deliveries hash.  ARGV: record JSON, message,
# task id ('' if unknown).  Removes exactly that record and, only if it was
# still there, puts its message back at the head of the queue with a fresh
# delivery count: two operators requeueing at once requeue it once.
REQUEUE_RECORD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
"""

PAGE = 500


def _records(storage):
    """(raw JSON, parsed record) for every dead letter, newest first, read
    in bounded pages."""
    start = 0
    while True:
        chunk = storage.conn.lrange(storage.keys.dead, start,
                                    start + PAGE - 1)
        for raw in chunk:
            try:
                yield raw, json.loads(raw)
            except ValueError:
                yield raw, {'id': None, 'reason': 'unreadable-record',
                            'detail': 'the dead-letter record is not JSON'}
        if len(chunk) < PAGE:
            return
        start += PAGE


def count(storage):
    return storage.conn.llen(storage.keys.dead)


def list_records(storage, limit=100):
    out = []
    for _, record in _records(storage):
        if len(out) >= limit:
            break
        shown = dict(record)
        shown.pop('message', None)
        shown['message_bytes'] = len(base64.b64decode(
            record.get('message') or ''))
        out.append(shown)
    return out


def _matches(record, selectors):
    return record.get('id') in selectors or \
        (record.get('task_id') and record['task_id'] in selectors)


def requeue(storage, selectors=None):
    """Put matching messages (by record id or task id; all when None) back
    in the queue.  Returns the records requeued."""
    script = storage.conn.register_script(REQUEUE_RECORD)
    done = []
    for raw, record in list(_records(storage)):
        if selectors is not None and not _matches(record, selectors):
            continue
        if not record.get('message'):
            continue
        message = base64.b64decode(record['message'])
        if script(keys=[storage.keys.dead, storage.queue_key,
                        storage.keys.deliveries],
                  args=[raw, message, record.get('task_id') or '']):
            done.append(record)
    return done


def purge(storage, selectors=None):
    """Delete matching dead letters for good.  Returns how many."""
    removed = 0
    for raw, record in list(_records(storage)):
        if selectors is None or _matches(record, selectors):
            removed += storage.conn.lrem(storage.keys.dead, 1, raw)
    return removed
