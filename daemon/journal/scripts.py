"""Lua scripts of the journal, for the two changes that must look at Redis
first: a note about a message that is back in the queue already, where a
worker may have taken it before the note arrives."""

# KEYS: record, log, queue, recent index.  ARGV: message, now, ttl, log
# length, task id, event (what happened), event (pending), reason, then
# the record's new fields as name/value pairs.  The message is looked for
# among the last REQUEUE_LOOK entries at the end workers take from.
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
redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
if waiting then
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
_cache = {}


def script_for(storage, text):
    key = (id(storage), text)
    script = _cache.get(key)
    if script is None:
        script = _cache[key] = storage.conn.register_script(text)
    return script
