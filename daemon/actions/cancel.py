"""Cancel: stop a task that runs now, and make sure the at-least-once
machinery never delivers it again.

One script (CANCEL) sets the task's cancel mark (Keys.cancel, JSON: who,
when, from where; it lives as long as the record) and, when the message
the task runs from was found in its worker's in-flight list, the
message's mark (Keys.cancel_message: its SHA-1), which every put-back
script reads (daemon/delivery.py REQUEUE_LIST, RECOVER_CONSUMER,
REQUEUE_ORPHAN; storage PUT_BACK): a consumer that dies, stops or is
recovered drops that message instead of putting it back, and records the
task canceled.  A worker that takes a message anyway (put back before the
cancel) reads the task's mark with its delivery count and ends it
canceled without running it.

The consumer running the task reads the marks of its busy workers' tasks
each pass (half a second) and passes the cancel on: a process worker gets
SIGTERM (TaskCanceled in the task; SIGKILL INTERRUPT_GRACE later if it
has not ended, then a fresh worker takes its place); a thread or greenlet
worker's task gets TaskCanceled at its next report_progress() or
check_cancelled() call, and a thread worker's, where none came within
the grace, raised in its thread.  The task ends `canceled`, its message
kept for a retry.

A task that waits (pending, scheduled, retrying) has not started:
cancelling it revokes it (as Celery's revoke(terminate=True) and Flower
do), ending `revoked` with the reason `canceled`, which `restore` undoes
until a worker takes it.  If the message of a task being cancelled went
back to the queue meanwhile (its consumer died), the script takes it out
of the queue and the task ends canceled at once."""
import time

from ..journal.layout import LOG_LENGTH, ttl_of
from ..journal.scripts import script_for
from ..storage import PRIORITY_LUA, message_data
from .base import Outcome, reply_of
from .revoke import REVOCABLE, _locate, revoke_one

# States in which a task may hold a worker or be on its way back to one.
RUNNING = ('running', 'interrupted', 'lost')

# KEYS: 1 record, 2 history, 3 the task's cancel mark, 4 queue list,
# 5 priority set, 6 recent index, 7 running index, 8 waiting index,
# 9 canceled index, 10 kept message, 11 deliveries hash, 12 outcome
# counters, 13 the in-flight list the message was seen in (the record's
# key when none was: not read then).  ARGV: 1 the message ('' when not
# found), 2 ttl, 3 now, 4 history length, 5 task id, 6 the
# cancel-requested event, 7 last_action, 8 the mark's value, 9 the message
# marks' prefix, 10 the canceled event, 11 the outcome counter's field.
# Returns {1, 'requested' or 'canceled', state before}, {2, same, state}
# when done before, {0, why, state}.
CANCEL = PRIORITY_LUA + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'unknown', ''} end
if state == 'canceled' then return {2, 'canceled', state} end
if state ~= 'running' and state ~= 'interrupted' and state ~= 'lost' then
  return {0, 'state', state}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {2, 'requested', state}
end
local raw = ARGV[1]
local ended = false
if raw ~= '' then
  local held = false
  for _, m in ipairs(redis.call('LRANGE', KEYS[13], 0, -1)) do
    if m == raw then held = true end
  end
  if held then
    redis.call('SET', ARGV[9] .. redis.sha1hex(raw), '1', 'EX', ARGV[2])
  else
    -- Put back since it was read (its consumer died): it waits, and
    -- nobody runs it now.
    local removed = redis.call('LREM', KEYS[4], 0, raw)
    if redis.call('ZREM', KEYS[5], raw) > 0 then
      removed = removed + 1
      hw_mark(KEYS[4], KEYS[5])
    end
    ended = removed > 0
  end
end
redis.call('RPUSH', KEYS[2], ARGV[6])
if ended then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished', ARGV[3],
             'updated', ARGV[3], 'cancel_requested', ARGV[3],
             'last_action', ARGV[7])
  redis.call('RPUSH', KEYS[2], ARGV[10])
  redis.call('ZREM', KEYS[7], ARGV[5])
  redis.call('ZREM', KEYS[8], ARGV[5])
  redis.call('ZADD', KEYS[9], ARGV[3], ARGV[5])
  redis.call('SET', KEYS[10], raw, 'EX', ARGV[2])
  redis.call('HDEL', KEYS[11], ARGV[5])
  redis.call('HINCRBY', KEYS[12], ARGV[11], 1)
else
  redis.call('SET', KEYS[3], ARGV[8], 'EX', ARGV[2])
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[3], 'updated',
             ARGV[3], 'last_action', ARGV[7])
end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[5])
if ended then return {1, 'canceled', state} end
return {1, 'requested', state}
"""

WHY = {
    'unknown': 'unknown task id (never enqueued, or its record expired)',
    'state': 'it has ended: only a running or waiting task can be '
             'cancelled',
}

RESULTS = {  # what each result means, for people
    'requested': 'cancel requested (it ends canceled when its worker stops '
                 'it)',
    'canceled': 'canceled',
    'revoked': 'revoked (it had not started)',
}


class CancelOutcome(Outcome):
    """An Outcome with `result`: 'requested' (the task runs; its worker
    stops it), 'canceled' (it has ended canceled) or 'revoked' (it was
    waiting: revoked, reason canceled)."""

    __slots__ = ('result',)

    def __init__(self, *args, result=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.result = result

    def as_dict(self):
        out = super().as_dict()
        if self.done:
            out['result'] = self.result
        return out


def _running_message(storage, task_id, consumer, worker):
    """(in-flight list, message) holding `task_id` in the lists of
    consumer identity `consumer`'s worker `worker` (those its heartbeat
    indexes), or (None, b'')."""
    from ..delivery import peek_message
    keys = storage.keys
    if not consumer or worker is None:
        return None, b''
    tail = ':%s' % worker
    for key in sorted(k.decode() for k in storage.conn.smembers(
            keys.consumer_lists(consumer))):
        if not key.endswith(tail):
            continue
        for raw in storage.conn.lrange(key, 0, -1):
            if peek_message(message_data(raw)).task_id == task_id:
                return key, raw
    return None, b''


def cancel_one(app, storage, task_id, actor):
    """Cancel `task_id` of `storage`'s queue.  Returns a CancelOutcome."""
    keys = storage.keys
    state, consumer, worker, name = (
        v.decode() if isinstance(v, bytes) else v
        for v in storage.conn.hmget(keys.task(task_id), 'state', 'consumer',
                                    'worker', 'name'))
    if state in REVOCABLE or state == 'revoked':
        # Not started: revoked (again: already, nothing changes).
        return _revoked(app, storage, task_id, actor)
    inflight, raw = _running_message(storage, task_id, consumer, worker) \
        if state in RUNNING else (None, b'')
    now = time.time()
    ttl = ttl_of(storage)
    reply = reply_of(script_for(storage, CANCEL)(
        keys=[keys.task(task_id), keys.task_log(task_id),
              keys.cancel(task_id), storage.queue_key, storage.priority_key,
              keys.journal_recent, keys.journal_state('running'),
              keys.journal_state('waiting'), keys.journal_state('canceled'),
              keys.message(task_id), keys.deliveries, keys.metrics_outcomes,
              inflight or keys.task(task_id)],
        args=[raw, ttl, repr(now), LOG_LENGTH, task_id,
              actor.event('cancel-requested', now),
              actor.last_action('cancel', now),
              actor.last_action('cancel', now), keys.cancel_message_prefix,
              '{"at": %r, "state": "canceled", "noted_by": "cancel"}' % now,
              '%s\tcanceled' % (name or '')]))
    done, why, before = reply
    if done == 0 and why == 'state' and before in REVOCABLE:
        # Put back and recorded pending since it was read: not started.
        return _revoked(app, storage, task_id, actor)
    if done:
        return CancelOutcome(task_id, storage.name, True, before,
                             already=done == 2, result=why)
    return CancelOutcome(task_id, storage.name, False, before or None, why,
                         WHY.get(why, why))


def _revoked(app, storage, task_id, actor):
    outcome = revoke_one(app, storage, task_id, actor, reason='canceled')
    if outcome.done:
        return CancelOutcome(task_id, storage.name, True, outcome.state,
                             already=outcome.already, result='revoked')
    return CancelOutcome(task_id, storage.name, False, outcome.state,
                         outcome.reason, WHY.get(outcome.reason,
                                                 outcome.detail))


def cancel(app, task_ids, actor, queue=None):
    """Cancel each of `task_ids` (found in any queue the app reports, or
    in `queue`): a running one is stopped by its worker, a waiting one
    revoked.  Returns [CancelOutcome]; ActionError for an unknown
    `queue`."""
    out = []
    for task_id in task_ids:
        storage = _locate(app, task_id, queue)
        if storage is None:
            out.append(CancelOutcome(task_id, queue, False, None, 'unknown',
                                     WHY['unknown']))
        else:
            out.append(cancel_one(app, storage, task_id, actor))
    return out
