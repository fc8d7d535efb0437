"""Lua scripts of the journal, for the changes that must look at Redis
first: a note about a message that is back in the queue already, where a
worker may have taken it before the note arrives, the end of a task
known only from the claim of a message that failed its checks, and a task
found waiting in the queue with no record; and the read of the queued
messages' beginnings that finds it."""

# KEYS: record, log, queue, recent index, priority set.  ARGV: message,
# now, ttl, log length, task id, event (what happened), event (pending),
# reason, then the record's new fields as name/value pairs.  The message
# (Huey's, without a priority prefix) is looked for among the last
# REQUEUE_LOOK entries at the end workers take from, then among the first
# REQUEUE_LOOK of the priority set (a priority message goes back there).
REQUEUE_LOOK = 1000
GUARDED_REQUEUE = """
local waiting = false
local look = %d
local step = 100
local from = -1
while not waiting and -from <= look do
  local chunk = redis.call('LRANGE', KEYS[3], from - step + 1, from)
  if #chunk == 0 then break end
  for _, msg in ipairs(chunk) do
    if msg == ARGV[1] then waiting = true break end
  end
  from = from - step
end
if not waiting then
  -- A priority message: Huey's message behind the set's prefix.
  local tail = #ARGV[1]
  for _, m in ipairs(redis.call('ZRANGE', KEYS[5], 0, look - 1)) do
    if #m > tail and string.byte(m, 1) == 0 and
        string.sub(m, -tail) == ARGV[1] then
      waiting = true
      break
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
-- A worker that took the message since has written its running already:
-- it notes the loss itself, before that (Journal.on_started), so the
-- history keeps the order things happened in.
if waiting then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  redis.call('HSET', KEYS[1], unpack(ARGV, 9))
  redis.call('RPUSH', KEYS[2], ARGV[7])
else
  redis.call('HSET', KEYS[1], 'requeued_reason', ARGV[8],
             'requeued_at', ARGV[2])
end
redis.call('HSET', KEYS[1], 'updated', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[5])
return waiting and 1 or 0
""" % REQUEUE_LOOK
# KEYS: record, log, recent index.  ARGV: now, ttl, log length, task id,
# event (pending), then the record's fields as name/value pairs, set only
# where missing.  The state becomes pending only from scheduled, retrying
# or nothing: never back from running or an end state.
GUARDED_ENQUEUE = """
local state = redis.call('HGET', KEYS[1], 'state')
for i = 6, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
local moved = not state or state == 'scheduled' or state == 'retrying'
  or state == 'pending'
if moved then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'updated', ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[5])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return moved and 1 or 0
"""
# KEYS: record, log, recent index, outcomes hash.  ARGV: now, ttl, log
# length, task id, event, outcomes field ('' for none), then the record's
# fields as name/value pairs.  The id comes from a message set aside
# unverified (bad signature, undecodable): it ends the record of a task
# that never ran, never one a worker runs or that ended already.
GUARDED_DEAD_LETTER = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' or state == 'complete' or state == 'revoked'
    or state == 'expired' or state == 'canceled' then
  return 0
end
redis.call('HSET', KEYS[1], 'updated', ARGV[1], unpack(ARGV, 7))
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4])
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[6], 1) end
return 1
"""
# KEYS: the queue.  ARGV: first and last position (as LRANGE takes them),
# bytes kept of each message.  The beginning of each queued message (its id
# and task name are there), never more: the reader looks for a task it has
# no record of without copying whole messages out of Redis.  Returns
# {bytes the messages had, {beginnings...}} (the reader sizes its next
# call by the first); nothing when the key is neither a list nor a sorted
# set.  A sorted set is Huey's PriorityRedisHuey queue: its members start
# with an 8-byte time prefix, left out.
QUEUE_HEADS = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local items, skip
if kind == 'list' then
  items, skip = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2]), 0
elseif kind == 'zset' then
  items, skip = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2]), 8
else
  return {0, {}}
end
local keep = tonumber(ARGV[3])
local size = 0
for i = 1, #items do
  size = size + #items[i] - skip
  items[i] = string.sub(items[i], skip + 1, skip + keep)
end
return {size, items}
"""
# KEYS: record, log, recent index.  ARGV: now, ttl, task id, event, then
# the record's fields as name/value pairs.  A task found waiting in the
# queue is recorded only where no record exists: a worker that took it
# meanwhile has written one, which is never touched.
GUARDED_SEEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'updated', ARGV[1], unpack(ARGV, 5))
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
return 1
"""
# KEYS: log.  ARGV: this delivery's running event (as pushed), the lost
# event, log length.  Run by a redelivery (the message was delivered
# before without an outcome): when the event before its running is the
# dead delivery's running (the consumer that put the message back found
# this delivery running it already and noted nothing), the loss goes in
# between.  Only what this suite writes between deliveries is passed
# over (a revoke request).  Returns 1 when noted.
NOTE_UNNOTED_LOSS = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[3]), -1)
for i = #items, 1, -1 do
  if items[i] == ARGV[1] then
    for j = i - 1, 1, -1 do
      local ok, event = pcall(cjson.decode, items[j])
      if ok and type(event) == 'table' and
          event.state ~= 'revoke-requested' then
        if event.state ~= 'running' then return 0 end
        redis.call('LINSERT', KEYS[1], 'BEFORE', ARGV[1], ARGV[2])
        return 1
      end
    end
    return 0
  end
end
return 0
"""
_cache = {}


def script_for(storage, text):
    key = (id(storage), text)
    script = _cache.get(key)
    if script is None:
        script = _cache[key] = storage.conn.register_script(text)
    return script
