"""Revoke and restore: a task that waits (pending, scheduled or retrying)
by id, or every task of a task name (Huey's revoke_all / restore_all).

Revoking by id sets Huey's own revoke mark (`r:<id>` among its results,
read by every worker before it runs a task, revoke once, expiring with
the results) and ends the journal record revoked, in one script (REVOKE):
a task a worker took meanwhile is refused, and its mark is not left
behind.  The worker that takes the message skips it (its outcome writes
`revoked` again, with the message kept for a retry).  Restoring before
that deletes the mark and puts the record back in the state it had
(RESTORE); after it, the task has ended: retry it instead.

Revoking a name sets Huey's name mark (`rt:<name>`, no expiry, as
revoke_all does) and marks the journal records of that name that wait
now as revoked (reason `name`), walking the name's index; restoring the
name deletes the mark and puts those records back.  A task of the name
enqueued later is revoked by the mark all the same; its record says so
when a worker skips it."""
import time

from .. import overview, tasknames
from ..journal.layout import LOG_LENGTH, ttl_of
from ..journal.scripts import MOVED_LUA, script_for
from .base import SELECT_MAX, ActionError, Outcome, reply_of

REVOCABLE = ('pending', 'scheduled', 'retrying')

# KEYS: 1 record, 2 history, 3 Huey's revoke mark of the id, 4 recent
# index, 5 waiting index, 6 revoked index.  ARGV: 1 the mark's value ('':
# none, the name's mark covers it), 2 ttl, 3 now, 4 history length, 5 task
# id, 6 event, 7 last_action, 8 reason ('operator' or 'name').  Returns
# {1, state before}, {2, state} when revoked already, {0, why, state}.
REVOKE = MOVED_LUA + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'unknown', ''} end
if state == 'revoked' then return {2, 'revoked', state} end
if state ~= 'pending' and state ~= 'scheduled' and state ~= 'retrying' then
  return {0, 'state', state}
end
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
end
hw_fold(KEYS[1], KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'revoked', 'revoked_from', state,
           'revoked_reason', ARGV[8], 'revoke_requested', ARGV[3],
           'updated', ARGV[3], 'last_action', ARGV[7])
hw_moved(KEYS[1], KEYS[2], ARGV[2], ARGV[4], KEYS[4], {KEYS[5]}, KEYS[6],
         ARGV[3], ARGV[5], ARGV[6])
return {1, 'revoked', state}
"""

# KEYS: as REVOKE.  ARGV: 1 'id' or 'name' (what is restored), 2 ttl,
# 3 now, 4 history length, 5 task id, 6 the restored event, 7
# last_action.  The record goes back to the state it was revoked from;
# the back-to event is written here as JSON by string concatenation of a
# fixed shape.  Returns {1, 'restored', state now}, {2, 'not-revoked',
# state} when there is nothing to undo, {0, why, state}.
RESTORE = MOVED_LUA + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'unknown', ''} end
local waiting = state == 'pending' or state == 'scheduled'
  or state == 'retrying'
local back
if state ~= 'revoked' then
  if not waiting then return {0, 'restore-state', state} end
  -- Revoked by Huey's own revoke_by_id (a producer), not by an action:
  -- the mark is all there is to undo.
  if ARGV[1] ~= 'id' or redis.call('DEL', KEYS[3]) == 0 then
    return {2, 'not-revoked', state}
  end
  back = state
else
  if redis.call('HEXISTS', KEYS[1], 'finished') == 1 then
    return {0, 'ended', state}
  end
  local reason = redis.call('HGET', KEYS[1], 'revoked_reason')
  if ARGV[1] == 'id' then
    if reason == 'name' then return {0, 'by-name', state} end
    -- No mark: a worker took the task and skips it (its outcome is on
    -- the way).
    if redis.call('DEL', KEYS[3]) == 0 then return {0, 'ended', state} end
  elseif reason ~= 'name' then
    return {0, 'by-id', state}
  end
  back = redis.call('HGET', KEYS[1], 'revoked_from') or 'pending'
  redis.call('HDEL', KEYS[1], 'revoked_from', 'revoked_reason',
             'revoke_requested')
end
-- The last delivery's running and end, told by the record's fields,
-- before the record changes (a refused restore writes nothing).
hw_fold(KEYS[1], KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'state', back, 'updated', ARGV[3],
           'last_action', ARGV[7])
hw_moved(KEYS[1], KEYS[2], ARGV[2], ARGV[4], KEYS[4], {KEYS[6]}, KEYS[5],
         ARGV[3], ARGV[5], ARGV[6],
         '{"at": ' .. ARGV[3] .. ', "state": "' .. back .. '"}')
return {1, 'restored', back}
"""

WHY = {
    'unknown': 'unknown task id (never enqueued, or its record expired)',
    'state': 'only pending, scheduled or retrying tasks can be revoked',
    'restore-state': 'only a revoked task (or a pending, scheduled or '
                     'retrying one revoked by Huey itself) can be restored',
    'ended': 'a worker took it and skipped it: it has ended revoked '
             '(retry it to run it)',
    'by-name': 'it is revoked with its whole task name: restore the name '
               '(restore --name)',
    'by-id': 'it was revoked by id, not by name: restore it by id',
    'not-revoked': 'it is not revoked',
}


def _keys(storage, task_id):
    keys = storage.keys
    return [keys.task(task_id), keys.task_log(task_id),
            storage.result_key('r:%s' % task_id), keys.journal_recent,
            keys.journal_state('waiting'), keys.journal_state('revoked')]


def _locate(app, task_id, queue):
    """(storage) of the queue whose journal knows `task_id` (recording a
    plain producer's waiting task on the way: overview.find_task), or
    None."""
    if queue is not None:
        storage = overview.storage_for(app, queue)
        if storage is None:
            raise ActionError('unknown queue %r' % queue, 404, 66)
        if storage.conn.exists(storage.keys.task(task_id)):
            return storage
    storage, record = overview.find_task(app, task_id)
    if record is None or (queue is not None and storage.name != queue):
        return None
    return storage


def _outcome(storage, task_id, reply, verb):
    done, why, state = reply_of(reply)
    if done == 1:
        return Outcome(task_id, storage.name, True, state)
    if done == 2 and why == verb:
        return Outcome(task_id, storage.name, True, state, already=True)
    return Outcome(task_id, storage.name, False, state or None, why,
                   WHY.get(why, why))


def revoke_one(app, storage, task_id, actor, reason='operator'):
    now = time.time()
    ttl = ttl_of(storage)
    mark = app.serializer.serialize((None, True)) if reason != 'name' \
        else b''
    reply = script_for(storage, REVOKE)(
        keys=_keys(storage, task_id),
        args=[mark, ttl, repr(now), LOG_LENGTH, task_id,
              actor.event('revoked', now, reason=reason),
              actor.last_action('revoke', now, reason=reason), reason])
    return _outcome(storage, task_id, reply, 'revoked')


def restore_one(app, storage, task_id, actor, what='id'):
    now = time.time()
    reply = script_for(storage, RESTORE)(
        keys=_keys(storage, task_id),
        args=[what, ttl_of(storage), repr(now), LOG_LENGTH, task_id,
              actor.event('restored', now,
                          reason='name' if what == 'name' else None),
              actor.last_action('restore', now)])
    outcome = _outcome(storage, task_id, reply, 'restored')
    if not outcome.done and outcome.reason == 'not-revoked':
        # Nothing to undo: restoring twice changes nothing the second time.
        outcome.done, outcome.already = True, True
    return outcome


def revoke(app, task_ids, actor, queue=None):
    """Revoke each waiting task of `task_ids`.  Returns [Outcome]."""
    return _each(app, task_ids, queue, lambda storage, task_id:
                 revoke_one(app, storage, task_id, actor))


def restore(app, task_ids, actor, queue=None):
    """Undo the revoke of each of `task_ids` that no worker skipped yet.
    Returns [Outcome]."""
    return _each(app, task_ids, queue, lambda storage, task_id:
                 restore_one(app, storage, task_id, actor))


def _each(app, task_ids, queue, act):
    out = []
    for task_id in task_ids:
        storage = _locate(app, task_id, queue)
        if storage is None:
            out.append(Outcome(task_id, queue, False, None, 'unknown',
                               WHY['unknown']))
        else:
            out.append(act(storage, task_id))
    return out


def resolve_name(app, storage, name):
    """The registered task name `name` means: as `huey-worker submit`
    resolves it when this process knows the task, else `name` itself if
    the journal knows tasks of that name.  ActionError (404) otherwise."""
    try:
        return tasknames.resolve_task(app, name)
    except tasknames.AmbiguousTask as exc:
        raise ActionError(str(exc), 400, 65)
    except tasknames.UnknownTask as exc:
        if storage.conn.exists(storage.keys.journal_name(name)):
            return name
        raise ActionError(str(exc), 404, 66)


def _waiting_of_name(storage, name):
    """Ids of the tasks of `name` the journal knows (newest first, at most
    SELECT_MAX), read from the name's index in pages."""
    key = storage.keys.journal_name(name)
    ids, start = [], 0
    while len(ids) < SELECT_MAX:
        chunk = storage.conn.zrevrange(key, start, start + 999)
        ids += [i.decode() for i in chunk]
        if len(chunk) < 1000:
            break
        start += 1000
    return ids[:SELECT_MAX]


def revoke_name(app, name, actor, queue=None):
    """Revoke every task of task name `name` (Huey's revoke_all: those
    enqueued later too, until restore_name).  Returns (the registered
    name, [Outcome] of the waiting tasks marked revoked now)."""
    storage = _queue(app, queue)
    full = resolve_name(app, storage, name)
    app.put('rt:%s' % full, (None, False))
    out = []
    for task_id in _waiting_of_name(storage, full):
        outcome = revoke_one(app, storage, task_id, actor, reason='name')
        if outcome.done and not outcome.already:
            out.append(outcome)
    return full, out


def restore_name(app, name, actor, queue=None):
    """Undo revoke_name.  Returns (the registered name, whether the name
    was revoked, [Outcome] of the tasks put back)."""
    storage = _queue(app, queue)
    full = resolve_name(app, storage, name)
    was = bool(storage.conn.delete(storage.result_key('rt:%s' % full)))
    out = []
    for task_id in _waiting_of_name(storage, full):
        outcome = restore_one(app, storage, task_id, actor, what='name')
        if outcome.done and not outcome.already:
            out.append(outcome)
    return full, was, out


def _queue(app, queue):
    storage = overview.storage_for(app, queue)
    if storage is None:
        raise ActionError('unknown queue %r' % queue, 404, 66)
    return storage
