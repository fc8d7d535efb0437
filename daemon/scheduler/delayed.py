"""Delayed and retrying tasks: moving the due ones from Huey's schedule
into the queue.

Huey's own schedule pop hands the due messages to the client, which then
pushes them: a scheduler dying in between loses them.  Here one script
takes a bounded batch of due messages off the schedule and pushes them
onto the queue, atomically, and only for the lease holder, so each is
moved exactly once.  Scores are Huey's (RedisStorage.convert_ts of a naive
UTC datetime), so `due` is computed with the same function.
"""
from .lease import LEADER_CHECK, NOT_LEADER
from .periodic import naive_utc

BATCH = 500

# KEYS: lease, schedule zset, queue.  ARGV: token, highest due score, batch
# size.  Returns the messages moved, earliest first (they leave the queue
# in that order: the queue is LPUSHed and read from the right).
MOVE_DUE = LEADER_CHECK + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
if #due > 0 then
  redis.call('ZREM', KEYS[2], unpack(due))
  redis.call('LPUSH', KEYS[3], unpack(due))
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
        return self.storage.convert_ts(naive_utc(now))

    def move_batch(self, token, now):
        """Move up to one batch of due messages; returns them, or None when
        the lease is not ours inside Redis (nothing moved)."""
        reply = self._script(
            keys=[self.lease_key, self.storage.schedule_key,
                  self.storage.queue_key],
            args=[token, repr(self.due_score(now)), self.batch])
        if reply == NOT_LEADER:
            return None
        return reply

    def pending_count(self):
        return self.conn.zcard(self.storage.schedule_key)
