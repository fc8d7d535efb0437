"""Retry: run again a task that ended failed (its retries used up), lost,
revoked or canceled, as a new delivery of the same task id with the same
arguments.

The journal keeps the message of such a task under Keys.message for as
long as its record (written with the outcome itself: Journal.on_outcome,
on_dead_letter; a purge keeps what it removes).  A retry is one script
(RETRY) that checks and enqueues in one step: the record must be in one
of those states, no delivery of the task may be under way (the
deliveries hash: a duplicate running), the kept message must be the one
read, and the task name must not be revoked as a whole.  Then the message
goes back to the queue (into the priority set when it has a priority),
the kept copy is dropped, the record is pending again with the history
saying `retried` (by whom, from where) and `pending`, and its `retried`
count grows.  Retrying twice enqueues once: the second call finds the
task pending.

The message put back is the one kept, with its retries restored to what
the task was enqueued with (retries_total) and no eta, when this process
knows the task (its module imported); otherwise as kept.  A dead letter of
the task (poison, unknown task) is removed in the same step, so a later
`dead-letters requeue` cannot run it a second time."""
import json
import time

from .. import deadletters, overview
from ..journal import reads
from ..journal.layout import LOG_LENGTH, RETRYABLE, ttl_of
from ..journal.scripts import MOVED_LUA, script_for
from ..storage import (PRIORITY_LUA, message_data, message_priority,
                       tag_message)
from ..journal.writer import RUNNING_DROPS
from .base import SELECT_MAX, ActionError, Outcome, reply_of

_DROPS = RUNNING_DROPS + ('dead_letter', 'revoked_from', 'revoked_reason',
                          'revoke_requested', 'requeued_reason',
                          'result', 'result_omitted')

# KEYS: 1 record, 2 history, 3 kept message, 4 queue list, 5 priority set,
# 6 priority sequence, 7 deliveries hash, 8 recent index, 9 waiting index,
# 10-12 the failed, revoked and canceled indexes, 13 Huey's revoke mark of
# the id, 14 Huey's revoke mark of the task name, 15 dead-letter list.
# ARGV: 1 the kept message as read, 2 the message to enqueue, 3 now, 4 ttl,
# 5 history length, 6 task id, 7 the retried event, 8 the pending event,
# 9 last_action, 10-13 the states a retry is allowed from, 14... dead
# letters of the task (their JSON) to remove.
# Returns {1, 'retried', state before} or {0, why, state}.
RETRY = PRIORITY_LUA + MOVED_LUA + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'unknown', ''} end
local allowed = false
for i = 10, 13 do
  if ARGV[i] == state then allowed = true end
end
if not allowed then return {0, 'state', state} end
if redis.call('HEXISTS', KEYS[7], ARGV[6]) == 1 then
  return {0, 'in-flight', state}
end
local kept = redis.call('GET', KEYS[3])
if not kept then return {0, 'no-message', state} end
if kept ~= ARGV[1] then return {0, 'changed', state} end
if redis.call('EXISTS', KEYS[14]) == 1 then
  return {0, 'name-revoked', state}
end
local m = ARGV[2]
local score = hw_score(m)
if score then
  hw_enqueue(KEYS[5], KEYS[6], m, score)
  hw_mark(KEYS[4], KEYS[5])
else
  redis.call('LPUSH', KEYS[4], m)
end
redis.call('DEL', KEYS[3], KEYS[13])
for i = 14, #ARGV do redis.call('LREM', KEYS[15], 1, ARGV[i]) end
-- The failed delivery's running and end, told by the record's fields
-- the next delivery overwrites.
hw_fold(KEYS[1], KEYS[2], ARGV[5])
redis.call('HDEL', KEYS[1], %s)
redis.call('HSET', KEYS[1], 'state', 'pending', 'updated', ARGV[3],
           'retried_at', ARGV[3], 'last_action', ARGV[9])
redis.call('HINCRBY', KEYS[1], 'retried', 1)
hw_moved(KEYS[1], KEYS[2], ARGV[4], ARGV[5], KEYS[8],
         {KEYS[10], KEYS[11], KEYS[12]}, KEYS[9], ARGV[3], ARGV[6], ARGV[7],
         ARGV[8])
return {1, 'retried', state}
""" % ', '.join("'%s'" % f for f in _DROPS)

WHY = {
    'unknown': 'unknown task id (never enqueued, or its record expired)',
    'state': 'only failed, lost, revoked or canceled tasks can be retried',
    'in-flight': 'a delivery of it is under way (a duplicate runs or waits '
                 'to be recovered)',
    'no-message': 'its message was not kept (a revoked task still waiting '
                  'in the queue: restore it instead; or one that ended '
                  'before the journal kept messages)',
    'changed': 'it changed while being retried (another retry?)',
    'name-revoked': 'its task name is revoked as a whole: restore the name '
                    'first (huey-worker restore --name)',
}


def _rebuild(app, kept, retries_total):
    """The message to enqueue: `kept` with its retries restored and no
    eta, when this process can decode it; else `kept` itself."""
    try:
        task = app.deserialize_task(message_data(kept))
    except Exception:
        return kept   # a task this process does not know: as it was
    if isinstance(retries_total, int):
        task.retries = retries_total
    task.eta = None
    data = app.serialize_task(task)
    priority = message_priority(kept)
    return tag_message(data, priority) if priority else data


def retry_one(app, storage, task_id, actor):
    """Retry `task_id` of `storage`'s queue.  Returns an Outcome."""
    keys = storage.keys
    conn = storage.conn
    record_key = keys.task(task_id)
    name, total, dead_letter = conn.hmget(record_key, 'name',
                                          'retries_total', 'dead_letter')
    kept = conn.get(keys.message(task_id))
    message = kept
    if kept is not None:
        try:
            total = int(total) if total is not None else None
        except ValueError:
            total = None
        message = _rebuild(app, kept, total)
    dead = deadletters.raw_records_of(storage, task_id) if dead_letter \
        else []
    now = time.time()
    name = name.decode() if name else ''
    reply = reply_of(script_for(storage, RETRY)(
        keys=[record_key, keys.task_log(task_id), keys.message(task_id),
              storage.queue_key, storage.priority_key, keys.priority_seq,
              keys.deliveries, keys.journal_recent,
              keys.journal_state('waiting'), keys.journal_state('failed'),
              keys.journal_state('revoked'), keys.journal_state('canceled'),
              storage.result_key('r:%s' % task_id),
              storage.result_key('rt:%s' % name), keys.dead],
        args=[kept or b'', message or b'', repr(now), ttl_of(storage),
              LOG_LENGTH, task_id,
              actor.event('retried', now),
              json.dumps({'state': 'pending', 'at': now}),
              actor.last_action('retry', now)] + list(RETRYABLE) + dead))
    done, why, state = reply
    if done:
        return Outcome(task_id, storage.name, True, state)
    return Outcome(task_id, storage.name, False, state or None, why,
                   WHY.get(why, why))


def retry(app, task_ids, actor, queue=None):
    """Retry each of `task_ids` (found in any queue the app reports, or
    in `queue`).  Returns [Outcome]."""
    out = []
    for task_id in task_ids:
        storage = _storage_of(app, task_id, queue)
        if storage is None:
            out.append(Outcome(task_id, queue, False, None, 'unknown',
                               WHY['unknown']))
            continue
        out.append(retry_one(app, storage, task_id, actor))
    return out


def select_retryable(app, storage, name=None, state=None, since=None,
                     until=None, field='finished', limit=SELECT_MAX):
    """The ids of tasks to retry by task name, state (one of RETRYABLE;
    all of them when None) and time window (epoch seconds on `field`),
    newest first, at most `limit`.  ActionError for a state that cannot
    be retried."""
    if state is not None and state not in RETRYABLE:
        raise ActionError('a retry selects failed, lost, revoked or '
                          'canceled tasks, not %r' % state)
    if name is None and state is None and since is None and until is None:
        raise ActionError('select tasks to retry by id, or by task name, '
                          'state or time window')
    limit = max(1, min(int(limit), SELECT_MAX))
    ids = []
    for one in ((state,) if state else RETRYABLE):
        cursor = True
        while cursor and len(ids) < limit:
            tasks, cursor = reads.find_tasks(
                app, storage, state=one, name=name, since=since,
                until=until, field=field, limit=min(1000, limit - len(ids)),
                cursor=None if cursor is True else cursor)
            ids += [t['id'] for t in tasks]
    return ids[:limit]


def _storage_of(app, task_id, queue):
    if queue is not None:
        storage = overview.storage_for(app, queue)
        if storage is None:
            raise ActionError('unknown queue %r' % queue, 404, 66)
        return storage
    for _, storage in overview.queue_storages(app):
        if storage.conn.exists(storage.keys.task(task_id)):
            return storage
    return None
