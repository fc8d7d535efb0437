"""Delayed and retrying tasks: moving the due ones from Huey's schedule
into the queue.

Huey's own schedule pop hands the due messages to the client, which then
pushes them: a scheduler dying in between loses them.  Here one script
takes a bounded batch of due messages off the schedule and pushes them
onto the queue, atomically, and only for the lease holder, so each is
moved exactly once.  Scores are unix seconds (SuiteStorage.convert_ts: a
naive eta read as UTC, not as the host's local time as Huey's own storage
does), so a score means the same moment on every host whatever its zone
or daylight-saving state, and `due` is the scheduler's wall clock:
Redis's (clock.RedisClock), so a scheduler on a host whose clock is off
moves nothing early or late.  The eta itself is the producer's: Huey
turns a delay into an eta by the enqueuing host's clock.

A task with a priority is scheduled with it (SuiteStorage.add_to_schedule)
and goes into the priority set, behind the messages of its priority that
are already waiting, as if enqueued now; plain ones go on the list.
"""
from ..storage import PRIORITY_LUA, message_data
from .lease import LEADER_CHECK, NOT_LEADER

BATCH = 500

# KEYS: lease, schedule zset, queue, priority set, priority sequence.
# ARGV: token, highest due score, batch size.  Returns the messages moved,
# earliest first (they leave the queue in that order: the queue is LPUSHed
# and read from the right; priority ones get their sequence numbers in
# that order).
MOVE_DUE = LEADER_CHECK + PRIORITY_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
if #due > 0 then
  redis.call('ZREM', KEYS[2], unpack(due))
  local plain = {}
  local ranked = false
  for _, msg in ipairs(due) do
    local score = hw_score(msg)
    if score then
      hw_enqueue(KEYS[4], KEYS[5], msg, score)
      ranked = true
    else
      plain[#plain + 1] = msg
    end
  end
  if #plain > 0 then redis.call('LPUSH', KEYS[3], unpack(plain)) end
  if ranked then hw_mark(KEYS[3], KEYS[4]) end
end
return due
"""


class DelayedMover:
    def __init__(self, conn, storage, lease_key, batch=BATCH):
        self.conn, self.storage = conn, storage
        self.lease_key = lease_key
        self.batch = batch
        self._script = conn.register_script(MOVE_DUE)

    def due_score(self, now):
        """The highest score due at unix time `now` (seconds)."""
        return float(now)

    def move_batch(self, token, now):
        """Move up to one batch of due messages; returns them, or None when
        the lease is not ours inside Redis (nothing moved)."""
        storage = self.storage
        reply = self._script(
            keys=[self.lease_key, storage.schedule_key, storage.queue_key,
                  storage.keys.priority, storage.keys.priority_seq],
            args=[token, repr(self.due_score(now)), self.batch])
        if reply == NOT_LEADER:
            return None
        return [message_data(raw) for raw in reply]

    def pending_count(self):
        return self.conn.zcard(self.storage.schedule_key)
