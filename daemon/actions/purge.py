"""Purge: empty a queue of its pending messages, or its schedule.

The queue is Huey's list plus the suite's priority set (with MARKER at the
list's head while the set holds messages: daemon/storage.py), and for an
adopted PriorityRedisHuey its own sorted set too.  Each is emptied in
batches of BATCH: the batch is read (from the end workers take from
last), the task id of each message read off its bytes (never unpickled:
journal.seen.message_claims), then one script (PURGE) removes exactly
those messages and, for each one it did remove, ends its journal record
revoked (reason: purged), keeps the message for a retry and clears its
revoke mark and delivery count.  A message a worker took between the
read and the script is no longer there, so the script leaves it (and its
record) alone: never a message a worker already took.  Only as many
messages as the queue held when the purge began are looked at, so tasks
enqueued meanwhile are not chased forever."""
import time

from ..journal.layout import LOG_LENGTH, ttl_of
from ..journal.scripts import script_for
from ..journal.seen import message_claims
from ..storage import MARKER, PRIORITY_LUA, message_data

BATCH = 100

# KEYS: 1 the container (list or sorted set), 2 the queue list, 3 the
# priority set, 4 recent index, 5 waiting index, 6 revoked index,
# 7 deliveries hash, then four per message: record, history, kept
# message, Huey's revoke mark.  ARGV: 1 kind ('list', 'zset' or 'native':
# Huey's own set, whose members carry an 8-byte time prefix), 2 now,
# 3 ttl, 4 history length, 5 the event, 6 last_action, 7 whether to set
# the marker right after (the priority set was touched), then two per
# message: the member as read, the task id ('' when unknown) and its
# name.  Returns how many messages it removed.
PURGE = PRIORITY_LUA + """
local kind = ARGV[1]
local removed = 0
local n = 0
for i = 8, #ARGV, 3 do
  local m, id, name = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local k = 7 + 4 * n
  n = n + 1
  local gone, kept = 0, m
  if kind == 'list' then
    gone = redis.call('LREM', KEYS[1], 1, m)
  else
    local score = redis.call('ZSCORE', KEYS[1], m)
    if score then
      gone = redis.call('ZREM', KEYS[1], m)
      if kind == 'native' then
        -- As the suite's queue holds it: a priority message when it has one.
        kept = string.sub(m, 9)
        local p = -tonumber(score)
        if p ~= 0 then
          kept = '\\0' .. string.rep('0', 16) .. tostring(p) .. '\\0' .. kept
        end
      end
    end
  end
  if gone > 0 then
    removed = removed + 1
    if id ~= '' then
      local state = redis.call('HGET', KEYS[k + 1], 'state')
      local ends = not state or state == 'pending' or state == 'scheduled'
        or state == 'retrying' or state == 'lost' or state == 'interrupted'
        or (state == 'revoked' and
            redis.call('HEXISTS', KEYS[k + 1], 'finished') == 0)
      if ends then
        if not state then
          redis.call('HSET', KEYS[k + 1], 'id', id, 'first_seen', ARGV[2],
                     'first_seen_in', 'queue')
          if name ~= '' then redis.call('HSET', KEYS[k + 1], 'name', name) end
        end
        redis.call('HSET', KEYS[k + 1], 'state', 'revoked',
                   'revoked_reason', 'purged', 'finished', ARGV[2],
                   'updated', ARGV[2], 'last_action', ARGV[6])
        redis.call('HDEL', KEYS[k + 1], 'revoked_from')
        redis.call('RPUSH', KEYS[k + 2], ARGV[5])
        redis.call('LTRIM', KEYS[k + 2], -tonumber(ARGV[4]), -1)
        redis.call('EXPIRE', KEYS[k + 1], ARGV[3])
        redis.call('EXPIRE', KEYS[k + 2], ARGV[3])
        redis.call('SET', KEYS[k + 3], kept, 'EX', ARGV[3])
        redis.call('DEL', KEYS[k + 4])
        redis.call('HDEL', KEYS[7], id)
        redis.call('ZADD', KEYS[4], ARGV[2], id)
        redis.call('ZREM', KEYS[5], id)
        redis.call('ZADD', KEYS[6], ARGV[2], id)
      end
    end
  end
end
if ARGV[7] == '1' then hw_mark(KEYS[2], KEYS[3]) end
return removed
"""


def _claims(raw):
    """(task id, task name) a queued message claims, ('', '') unknown."""
    claim = message_claims(message_data(raw)[:512])
    if claim is None:
        return '', ''
    return claim[0], claim[1] or ''


def _batches(storage, key, kind, budget):
    """Members of `key` to purge, a batch at a time, until `budget` were
    handed out or the container is empty."""
    conn = storage.conn
    while budget > 0:
        size = min(BATCH, budget)
        if kind == 'list':
            # The newest end: workers take from the other one.
            batch = [m for m in conn.lrange(key, 0, size - 1)
                     if m != MARKER]
        else:
            # The last ranked: workers (and the scheduler) take the first.
            batch = conn.zrange(key, -size, -1)
        if not batch:
            return
        budget -= len(batch)
        yield batch


def _purge_container(storage, actor, key, kind, budget, mark):
    keys = storage.keys
    script = script_for(storage, PURGE)
    now = time.time()
    event = actor.event('revoked', now, reason='purged')
    action = actor.last_action('purge', now)
    removed = 0
    for batch in _batches(storage, key, kind, budget):
        script_keys = [key, storage.queue_key, storage.priority_key,
                       keys.journal_recent, keys.journal_state('waiting'),
                       keys.journal_state('revoked'), keys.deliveries]
        args = [kind, repr(now), ttl_of(storage), LOG_LENGTH, event, action,
                '1' if mark else '0']
        for member in batch:
            task_id, name = _claims(member[8:] if kind == 'native'
                                    else member)
            script_keys += [keys.task(task_id), keys.task_log(task_id),
                            keys.message(task_id),
                            storage.result_key('r:%s' % task_id)]
            args += [member, task_id, name]
        removed += script(keys=script_keys, args=args)
    return removed


def purge_size(storage, schedule=False):
    """How many messages a purge would look at: the queue's (as
    queue_size counts them) or the schedule's."""
    if schedule:
        return storage.conn.zcard(storage.schedule_key)
    return storage.queue_size()


def purge_queue(storage, actor):
    """Remove every message waiting in `storage`'s queue (list, priority
    set, and an adopted PriorityRedisHuey's own set).  Returns how many
    were removed."""
    conn = storage.conn
    removed = 0
    native = getattr(storage, 'native_key', None)
    if native is not None:
        removed += _purge_container(storage, actor, native, 'native',
                                    conn.zcard(native), False)
    removed += _purge_container(storage, actor, storage.priority_key,
                                'zset', conn.zcard(storage.priority_key),
                                True)
    removed += _purge_container(storage, actor, storage.queue_key, 'list',
                                conn.llen(storage.queue_key), True)
    return removed


def purge_schedule(storage, actor):
    """Remove every message in `storage`'s schedule (delayed tasks and
    retries waiting their delay).  Returns how many were removed."""
    return _purge_container(storage, actor, storage.schedule_key, 'zset',
                            storage.conn.zcard(storage.schedule_key), False)

