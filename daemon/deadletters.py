"""The dead-letter list: messages set aside instead of run (bad signature,
unknown task, undecodable, poison).  Listing, requeueing and purging, for
the CLI and the status endpoint.  Each record keeps the original message,
so nothing set aside is lost until an operator purges it.

A record: id, reason, detail, at, task_id (None when the message does not
say), task_id_verified (False when the id was read off a message that
failed its checks: only what it claims), task_name, hint (what else may
be wrong, when the worker saw something), where (the worker), message
(base64)."""
import base64
import json
import time

from .journal.layout import LOG_LENGTH, ttl_of
from .journal.scripts import MOVED_LUA

# Each reason as a task's journal record tells it (error.message), with
# what it means when the detail alone would not say.
REASONS = {
    'bad-signature': ('bad signature', "the message was not signed with "
                      "this consumer's [huey] secret_key"),
    'unknown-task': ('unknown task', None),
    'undecodable': ('undecodable message', None),
    'poison': ('poison message', None),
}


def explain(record):
    """One line saying why the message of `record` was set aside."""
    reason = record.get('reason')
    label, meaning = REASONS.get(reason, (reason, None))
    text = 'set aside: %s (%s)' % (label, meaning or record.get('detail'))
    if record.get('hint'):
        text += '; %s' % record['hint']
    return text

# KEYS: dead list, queue, deliveries hash, the task's journal record, its
# history, the journal's recent index, the failed and waiting state
# indexes, the task's kept message.  ARGV: record JSON, message, task id
# ('' if unknown), now, time to live, history length, event (JSON).
# Removes exactly that record and, only if it was still there, puts its
# message back at the head of the queue with a fresh delivery count: two
# operators requeueing at once requeue it once.  A journal record the dead
# letter ended failed is pending again, so pollers wait for the new run.
REQUEUE_RECORD = MOVED_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] == '' then return 1 end
redis.call('HDEL', KEYS[3], ARGV[3])
if redis.call('HGET', KEYS[4], 'state') == 'failed'
    and redis.call('HEXISTS', KEYS[4], 'dead_letter') == 1 then
  hw_fold(KEYS[4], KEYS[5], ARGV[6])
  redis.call('HDEL', KEYS[4], 'finished', 'error_type', 'error_message',
             'dead_letter')
  redis.call('HSET', KEYS[4], 'state', 'pending', 'updated', ARGV[4],
             'requeued_reason', 'dead-letter', 'requeued_at', ARGV[4])
  redis.call('HINCRBY', KEYS[4], 'requeues', 1)
  hw_moved(KEYS[4], KEYS[5], ARGV[5], ARGV[6], KEYS[6], {KEYS[7]}, KEYS[8],
           ARGV[4], ARGV[3], ARGV[7])
  -- Back in the queue: a retry must not push it a second time.
  redis.call('DEL', KEYS[9])
end
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
    keys = storage.keys
    done = []
    for raw, record in list(_records(storage)):
        if selectors is not None and not _matches(record, selectors):
            continue
        if not record.get('message'):
            continue
        message = base64.b64decode(record['message'])
        task_id = record.get('task_id') or ''
        now = time.time()
        event = json.dumps({'state': 'pending', 'at': now,
                            'requeued_reason': 'dead-letter'})
        if script(keys=[keys.dead, storage.queue_key, keys.deliveries,
                        keys.task(task_id), keys.task_log(task_id),
                        keys.journal_recent, keys.journal_state('failed'),
                        keys.journal_state('waiting'),
                        keys.message(task_id)],
                  args=[raw, message, task_id, repr(now), ttl_of(storage),
                        LOG_LENGTH, event]):
            done.append(record)
    return done


def purge(storage, selectors=None):
    """Delete matching dead letters for good.  Returns how many."""
    removed = 0
    for raw, record in list(_records(storage)):
        if selectors is None or _matches(record, selectors):
            removed += storage.conn.lrem(storage.keys.dead, 1, raw)
    return removed


def raw_records_of(storage, task_id, limit=100):
    """The dead letters (their JSON, as the list holds them) of `task_id`,
    for an action that removes them with the task's retry."""
    out = []
    for raw, record in _records(storage):
        if record.get('task_id') == task_id and \
                record.get('task_id_verified') is not False:
            out.append(raw)
            if len(out) >= limit:
                break
    return out
