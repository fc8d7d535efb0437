"""Lua scripts of the journal, for the changes that must look at Redis
first: a note about a message that is back in the queue already, where a
worker may have taken it before the note arrives, the end of a task
known only from the claim of a message that failed its checks, and a task
found waiting in the queue with no record; and the read of the queued
messages' beginnings that finds it."""
import hashlib


# A Lua function, put before the text of scripts that end a delivery or
# overwrite the fields of a task's last one (the requeue of a dead
# worker's message, an operator's retry, revoke or restore, a dead
# letter's requeue): hw_fold(record, history, length) pushes the events
# the record's fields tell instead of the history (reads.unlogged_events
# makes the same: a field run:<started> -> worker label per delivery
# whose running is not in the history, and `unlogged` 'o' for the end
# the record's state, finished, duration and error_type tell), each
# after the last event at or before its time, keeps the last `length`
# and drops those fields.  Returns how many events it pushed.
FOLD_LUA = """
local function hw_fold(record, history, length)
  local all = redis.call('HGETALL', record)
  local f, runs, drop = {}, {}, {}
  for i = 1, #all, 2 do
    local name = all[i]
    if string.sub(name, 1, 4) == 'run:' then
      local at = string.sub(name, 5)
      if tonumber(at) then
        runs[#runs + 1] = {tonumber(at), '{"state": "running", ' ..
          '"worker": ' .. cjson.encode(all[i + 1]) .. ', "at": ' .. at ..
          '}'}
      end
      drop[#drop + 1] = name
    else
      f[name] = all[i + 1]
    end
  end
  local ending
  if f.unlogged then
    drop[#drop + 1] = 'unlogged'
    if string.find(f.unlogged, 'o', 1, true) and f.state and
        tonumber(f.finished) then
      local text = '{"state": ' .. cjson.encode(f.state)
      if tonumber(f.duration) then
        text = text .. ', "duration": ' .. f.duration
      end
      if f.error_type then
        text = text .. ', "error": ' .. cjson.encode(f.error_type)
      end
      ending = text .. ', "at": ' .. f.finished .. '}'
    end
  end
  if #drop > 0 then redis.call('HDEL', record, unpack(drop)) end
  if #runs == 0 and not ending then return 0 end
  table.sort(runs, function(a, b) return a[1] < b[1] end)
  local items = redis.call('LRANGE', history, 0, -1)
  local before = #items
  local moved = false
  local times, kinds = {}, {}
  for i, item in ipairs(items) do
    local ok, event = pcall(cjson.decode, item)
    times[i] = ok and type(event) == 'table' and tonumber(event.at) or 0
    kinds[i] = ok and type(event) == 'table' and event.state or ''
  end
  -- As reads.with_unlogged_events places them (see there): the last
  -- delivery's running after every event but requests made during it,
  -- earlier ones by time, the end last.
  for r, run in ipairs(runs) do
    local pos = #items + 1
    if r == #runs then
      while pos > 1 and times[pos - 1] > run[1] and
          (kinds[pos - 1] == 'revoke-requested' or
           kinds[pos - 1] == 'cancel-requested') do
        pos = pos - 1
      end
    else
      while pos > 1 and times[pos - 1] > run[1] do pos = pos - 1 end
    end
    if pos <= #items then moved = true end
    table.insert(items, pos, run[2])
    table.insert(times, pos, run[1])
    table.insert(kinds, pos, 'running')
  end
  if ending then items[#items + 1] = ending end
  if not moved then
    for i = before + 1, #items do redis.call('RPUSH', history, items[i]) end
  else
    redis.call('DEL', history)
    redis.call('RPUSH', history, unpack(items))
  end
  redis.call('LTRIM', history, -tonumber(length), -1)
  -- The history lives as long as its record (a list made here, or
  -- written anew, has no time to live of its own).
  local ttl = redis.call('PTTL', record)
  if ttl > 0 then redis.call('PEXPIRE', history, ttl) end
  return #runs + (ending and 1 or 0)
end
"""
# KEYS: record, log, queue, recent index (the first layout's: unused),
# priority set, and (optional)
# the running and waiting state indexes.  ARGV: message,
# now, ttl, log length, task id, event (what happened), event (pending),
# reason, then the record's new fields as name/value pairs.  The message
# (Huey's, without a priority prefix) is looked for among the last
# REQUEUE_LOOK entries at the end workers take from, then among the first
# REQUEUE_LOOK of the priority set (a priority message goes back there).
REQUEUE_LOOK = 1000
GUARDED_REQUEUE = FOLD_LUA + """
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
  -- The lost delivery's running, told by the record until now.
  hw_fold(KEYS[1], KEYS[2], ARGV[4])
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
if waiting and KEYS[7] then
  redis.call('ZREM', KEYS[6], ARGV[5])
  redis.call('ZADD', KEYS[7], ARGV[2], ARGV[5])
end
return waiting and 1 or 0
""" % REQUEUE_LOOK
# KEYS: record, log, recent index (unused), waiting state index, and (when the
# task name is known) its name index.  ARGV: now, ttl, log length, task
# id, event (pending), then the record's fields as name/value pairs, set
# only where missing.  The state becomes pending only from scheduled,
# retrying or nothing: never back from running or an end state.
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
  if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[1], ARGV[4]) end
end
if not state and KEYS[5] then
  redis.call('ZADD', KEYS[5], ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return moved and 1 or 0
"""
# A producer's enqueue of a task without an eta (storage.enqueue's LPUSH
# carrying the record the enqueue signal staged), in one command: a web
# request waits on this round trip, and one script costs Redis and the
# client less than MULTI, five commands, LPUSH and EXEC (bench/run.py's
# enqueue section).  No worker sees the message before the record (a
# script runs whole); the LPUSH goes first so that a queue key Redis
# refuses it on (WRONGTYPE) leaves no record behind.  KEYS: record, state
# index, name index, queue.
# ARGV: now, ttl, task id, message, task name, retries, then the record's
# other fields as name/value pairs (the fields every record has are
# spelled here: each argument costs the producer and Redis a little).
# Returns the queue's length, as LPUSH does.
ENQUEUE_RECORDED = """
local queued = redis.call('LPUSH', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[1], 'updated', ARGV[1], 'enqueued', ARGV[1],
  'state', 'pending', 'name', ARGV[5], 'retries_total', ARGV[6],
  'retries_left', ARGV[6], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return queued
"""
ENQUEUE_RECORDED_SHA = hashlib.sha1(ENQUEUE_RECORDED.encode()).hexdigest()
# KEYS: record, log, recent index (unused), outcomes hash, and (optional) the
# waiting, running and failed state indexes.  ARGV: now, ttl, log
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
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[6], 1) end
if KEYS[7] then
  redis.call('ZREM', KEYS[5], ARGV[4])
  redis.call('ZREM', KEYS[6], ARGV[4])
  redis.call('ZADD', KEYS[7], ARGV[1], ARGV[4])
end
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
# KEYS: record, log, recent index (unused), and (optional) the waiting
# state index
# and the task name's index.  ARGV: now, ttl, task id, event, then
# the record's fields as name/value pairs.  A task found waiting in the
# queue is recorded only where no record exists: a worker that took it
# meanwhile has written one, which is never touched.
GUARDED_SEEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'updated', ARGV[1], unpack(ARGV, 5))
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[1], ARGV[3]) end
if KEYS[5] then
  redis.call('ZADD', KEYS[5], ARGV[1], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
return 1
"""
# KEYS: log, record.  ARGV: the lost event, log length, ttl, the field
# of this delivery's running (run:<started>).  Run by a redelivery (the
# message was delivered before without an outcome): when the record
# still holds another delivery's running field, the consumer that put
# the message back did not fold it with a note (a worker had taken the
# message again first, or it died), and the loss is noted here; the dead
# delivery's running stays told by its field, before the loss by time,
# this delivery's after it (reads.with_unlogged_events).  Returns 1 when
# noted.
NOTE_UNNOTED_LOSS = """
local unnoted = false
for _, name in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(name, 1, 4) == 'run:' and name ~= ARGV[4] then
    unnoted = true
  end
end
if not unnoted then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: the results-held hash (hour -> results stored then).  ARGV: the
# first hour still held.  Drops the hours before it: at most a week's
# hours (168) are looked at, once every TRIM_EVERY outcomes.
TRIM_HELD = """
for _, hour in ipairs(redis.call('HKEYS', KEYS[1])) do
  if tonumber(hour) == nil or tonumber(hour) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], hour)
  end
end
return 1
"""
# KEYS: the results-held hash, the first layout's results index.  ARGV:
# now, seconds results are held.  How many results Huey holds: the hours'
# counts, the oldest hour (partly past) in proportion, plus what the old
# index still holds.  Returns an integer.
HELD_COUNT = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local low = now - ttl
local total = 0
local pairs_ = redis.call('HGETALL', KEYS[1])
for i = 1, #pairs_, 2 do
  local hour = tonumber(pairs_[i])
  local n = tonumber(pairs_[i + 1]) or 0
  if hour then
    local from, to = hour * 3600, hour * 3600 + 3600
    if from >= low then
      total = total + n
    elseif to > low then
      total = total + n * (to - low) / 3600
    end
  end
end
total = total + redis.call('ZCOUNT', KEYS[2], low, '+inf')
return math.floor(total + 0.5)
"""
# A Lua function for scripts that move a journal record to another state
# (the operator's actions, the requeue of a dead letter), put before their
# text (with hw_fold, which each calls before it changes the record):
# hw_moved(record, history, ttl, length, recent, leaving, entering,
# now, id, event...) appends the events (JSON) to the history and keeps
# its last `length`, gives the record and the history `ttl` seconds more,
# puts task `id` first in the recent index and moves it from the state
# indexes in the table `leaving` into the state index `entering` (both
# indexes scored `now`).
MOVED_LUA = FOLD_LUA + """
local function hw_moved(record, history, ttl, length, recent, leaving,
                        entering, now, id, ...)
  redis.call('RPUSH', history, ...)
  redis.call('LTRIM', history, -tonumber(length), -1)
  redis.call('EXPIRE', record, ttl)
  redis.call('EXPIRE', history, ttl)
  redis.call('ZADD', recent, now, id)
  for _, index in ipairs(leaving) do redis.call('ZREM', index, id) end
  redis.call('ZADD', entering, now, id)
end
"""
_cache = {}


def script_for(storage, text):
    """The Lua script `text` registered on `storage`'s Redis client (a
    redis-py Script: EVALSHA, loading it again after a SCRIPT FLUSH), one
    per client and text for the life of the process.  Keyed by the client:
    the Script holds it, so its id cannot be taken by another client while
    the entry lives (a storage's id could, once that storage is gone)."""
    key = (id(storage.conn), text)
    script = _cache.get(key)
    if script is None:
        script = _cache[key] = storage.conn.register_script(text)
    return script


# One fold, for a change staged on the worker's own round trip (a retry,
# its own requeue): KEYS record, history; ARGV history length.
FOLD = FOLD_LUA + "return hw_fold(KEYS[1], KEYS[2], ARGV[1])"
