"""Task locks (Huey's `@huey.lock_task('report')`) that a dead worker does
not hold for ever.

Huey's lock is a key (`<app name>.lock.<lock name>` in its result store,
`huey.r.<queue>.<that>` in Redis) set with SET NX when the task body
enters the lock and deleted when it leaves.  A worker killed in between
(SIGKILL, the OOM killer, a host lost) never deletes it, and with no ttl
the key lives on: the redelivered task, and every later run of any task
taking that lock, fails with TaskLockedException.

Here a lock taken by a task a suite worker runs carries its owner: the key
holds a token (JSON: task id and name, a nonce of this delivery, host,
pid, consumer, worker, when) instead of Huey's '1', and the queue's owner
index (hash hw:<queue>:locks, lock key -> token) lists the locks held
that way.  The owner of a lock is dead once the message of its task has
gone back to the queue, so:

* the redelivered task takes over a lock an earlier delivery of the same
  task holds (a task id is run by one worker at a time: the in-flight
  list holds its one message), in the same script as the SET NX;
* when the consumer puts a dead worker's or consumer's message back in
  the queue (hooks.on_requeued), the locks of that task are deleted if
  its message still waits there (atomically checked: never a lock a new
  delivery took over meanwhile);
* a delivery that ends after taking over or after an earlier delivery
  died drops what earlier deliveries of its task still hold (its own
  locks, released or not, are left as Huey leaves them);
* a message set aside as a dead letter (a poison message) releases the
  locks of its task.
Locks taken outside a suite worker (a producer using lock_task as a
context manager, Huey's own consumer) stay plain Huey locks.  `[consumer]
flush_locks` deletes every lock the app declares at consumer start, as
`huey_consumer --flush-locks` does (docs/delivery.md, "Task locks").
"""
import json
import logging
import math
import os
import threading
import time

from . import context, delivery, hooks, progress
from .journal.scripts import script_for

log = logging.getLogger('huey_worker.locks')

# KEYS: lock key, owner index.  ARGV: token, ttl in seconds ('' for
# none), task id, delivery nonce.  Returns 1 (taken), 2 (taken over from
# an earlier delivery of the same task) or 0 (held by someone else).
ACQUIRE = """
local function put(nx)
  local args = {'SET', KEYS[1], ARGV[1]}
  if nx then args[#args + 1] = 'NX' end
  if ARGV[2] ~= '' then
    args[#args + 1] = 'EX'
    args[#args + 1] = ARGV[2]
  end
  return redis.call(unpack(args))
end
if put(true) then
  redis.call('HSET', KEYS[2], KEYS[1], ARGV[1])
  return 1
end
local held = redis.call('GET', KEYS[1])
if not held or held ~= redis.call('HGET', KEYS[2], KEYS[1]) then return 0 end
local ok, owner = pcall(cjson.decode, held)
if ok and type(owner) == 'table' and owner.task == ARGV[3]
    and owner.delivery ~= ARGV[4] then
  put(false)
  redis.call('HSET', KEYS[2], KEYS[1], ARGV[1])
  return 2
end
return 0
"""

# KEYS: owner index, queue list, priority set.  ARGV: task id, delivery
# nonce to keep ('' for none), Huey's message ('' for no waiting check).
# Deletes the locks the task's other deliveries hold (a lock whose key
# holds another value was released and taken again: only its index entry
# goes); the entries of the kept delivery leave the index, its locks stay.
# With a message, only while it waits in the queue (the last
# WAITING_LOOK entries at the end workers take from, or the priority
# set): a worker that took it since may hold those locks by now.
# Returns how many locks were deleted.
RELEASE_TASK = """
local message = ARGV[3]
if message ~= '' then
  local waiting = false
  local look, step, from = %d, 100, -1
  while not waiting and -from <= look do
    local chunk = redis.call('LRANGE', KEYS[2], from - step + 1, from)
    if #chunk == 0 then break end
    for _, m in ipairs(chunk) do
      if m == message then waiting = true break end
    end
    from = from - step
  end
  if not waiting then
    for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, look - 1)) do
      if #m > #message and string.byte(m, 1) == 0 and
          string.sub(m, -#message) == message then
        waiting = true
        break
      end
    end
  end
  if not waiting then return 0 end
end
local deleted = 0
local index = redis.call('HGETALL', KEYS[1])
for i = 1, #index, 2 do
  local key, token = index[i], index[i + 1]
  local ok, owner = pcall(cjson.decode, token)
  if ok and type(owner) == 'table' and owner.task == ARGV[1] then
    if owner.delivery ~= ARGV[2] and redis.call('GET', key) == token then
      deleted = deleted + redis.call('DEL', key)
    end
    redis.call('HDEL', KEYS[1], key)
  end
end
return deleted
"""
WAITING_LOOK = 1000
RELEASE_TASK = RELEASE_TASK % WAITING_LOOK


def index_key(storage):
    """The owner index of `storage`'s queue (lock key -> token)."""
    return storage.keys.prefix + 'locks'


class _Delivery(threading.local):
    task = None          # the Task object of the delivery these are for
    nonce = None
    took = False         # this delivery took a lock with an owner
    redelivered = False  # an earlier delivery of it ended without outcome


_state = _Delivery()

# What acquire() and release() answer for a key they leave to Huey.
NOT_MINE = object()


def _delivery_of(task):
    """This thread's lock state of the delivery running `task`."""
    if _state.task is not task:
        _state.task, _state.nonce = task, os.urandom(8).hex()
        _state.took = _state.redelivered = False
    return _state


def _owned(app, key):
    """The storage and task when the lock `key` is to carry an owner: a
    lock Huey knows (TaskLock adds its key to app._locks) taken inside a
    task a suite worker runs on the suite's storage."""
    task = context.current_task()
    if task is None or key not in app._locks:
        return None, None
    storage = app.storage
    if not hasattr(storage, 'stage') or not hasattr(storage, 'keys'):
        return None, None
    return storage, task


def acquire(app, key, ttl):
    """Huey's put_if_empty for a lock key: True when taken.  NOT_MINE when
    the lock is not one to carry an owner (the caller does what Huey
    does).  Raises redis errors."""
    storage, task = _owned(app, key)
    if storage is None:
        return NOT_MINE
    state = _delivery_of(task)
    worker = context.current_worker() or {}
    token = json.dumps({
        'task': task.id, 'name': app._registry.task_to_string(type(task)),
        'delivery': state.nonce, 'host': worker.get('host'),
        'pid': worker.get('pid', os.getpid()),
        'consumer': worker.get('consumer'), 'worker': worker.get('worker'),
        'at': round(time.time(), 3)}, sort_keys=True)
    lock_key = storage.result_key(key)
    script = script_for(storage, ACQUIRE)
    taken = storage.flush(lambda conn: script(
        keys=[lock_key, index_key(storage)],
        args=[token, '' if not ttl else max(1, math.ceil(ttl)), task.id,
              state.nonce],
        client=conn))
    if taken:
        state.took = True
    if taken == 2:
        log.warning('lock %r taken over by %s %s from an earlier delivery '
                    'of the same task, which ended without releasing it',
                    key.split('.lock.', 1)[-1],
                    app._registry.task_to_string(type(task)), task.id)
    return bool(taken)


def release(app, key):
    """Huey's delete for a lock key: the key and its owner entry go
    together (the number of keys deleted; None while Huey's writes are
    held back, when it rides the ack).  NOT_MINE for other keys.  Raises
    redis errors."""
    if key not in app._locks:
        return NOT_MINE
    storage = app.storage
    if not hasattr(storage, 'stage') or not hasattr(storage, 'keys'):
        return NOT_MINE
    lock_key = storage.result_key(key)
    storage.stage_command('HDEL', index_key(storage), lock_key)
    if storage.deferring:
        # Huey's writes after the body ride the ack, and so does this.
        storage.stage_command('DEL', lock_key)
        return None
    return storage.flush(lambda conn: conn.delete(lock_key))


def stage_release(storage, task_id, keep='', message=b''):
    """Stage the release of the locks task `task_id` holds, on the
    thread's next round trip: all but those of delivery `keep` (its
    nonce), and, with `message`, only while that message still waits in
    the queue (a new delivery may have taken the locks over)."""
    keys = [index_key(storage), storage.queue_key,
            getattr(storage, 'priority_key', storage.queue_key + ':none')]
    script = script_for(storage, RELEASE_TASK)

    def write(pipe):
        script(keys=keys, args=[task_id, keep, message], client=pipe)
    storage.stage(write)


# -- delivery hooks --------------------------------------------------------

def on_started(storage, task, replies):
    # An earlier delivery of this message ended without outcome: what it
    # may hold goes at this one's end (on_outcome).
    deliveries = hooks.delivery_count(replies)
    _delivery_of(task).redelivered = deliveries is not None and \
        deliveries > 1


def on_outcome(storage, task, state_name, duration):
    state = _delivery_of(task)
    if state.took or state.redelivered:
        stage_release(storage, task.id, keep=state.nonce)
    _state.task = None


def on_requeued(storage, messages, reason):
    if not hasattr(storage, 'keys'):
        return
    staged = False
    for raw in messages:
        # The id read off the message, never unpickled again: this runs on
        # the consumer's main thread too, for messages of dead workers.
        task_id = delivery.peek_message(raw).task_id
        if task_id is not None:
            stage_release(storage, task_id, message=raw)
            staged = True
    _state.task = None
    # The consumer's main thread recovering a dead worker runs no task: no
    # round trip of its own follows, so it sends now.
    if staged and progress.current() is None:
        storage.flush()


def on_dead_letter(storage, record):
    task_id = record.get('task_id')
    if task_id and record.get('task_id_verified') is not False and \
            hasattr(storage, 'keys'):
        stage_release(storage, task_id)


_installed = []


def install():
    """Hook lock ownership into the delivery path (idempotent)."""
    if _installed:
        return
    _installed.append(True)
    hooks.on_started.append(on_started)
    hooks.on_outcome.append(on_outcome)
    hooks.on_requeued.append(on_requeued)
    hooks.on_dead_letter.append(on_dead_letter)


def flush(app, names=()):
    """Delete every lock `app` declares (and the lock names in `names`),
    whoever holds them, as huey_consumer --flush-locks does: {lock
    names found held}.  Raises redis errors."""
    found = app.flush_locks(*names)
    if found:
        log.warning('stale locks flushed at start ([consumer] flush_locks): '
                    '%s', ', '.join(sorted(found)))
    return found
