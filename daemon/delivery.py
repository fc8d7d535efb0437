"""At-least-once delivery: putting in-flight messages back and setting bad
ones aside.  Each move is one Lua script, so it is atomic: when several
consumers recover the same dead one at the same moment, exactly one of
them moves its messages (the others find the lists empty)."""
import base64
import json
import logging
import time
import uuid

from . import hooks

log = logging.getLogger('huey_worker.delivery')

# KEYS: inflight list, queue.  Moves every message back to the head of the
# queue (the end BRPOPLPUSH takes from), oldest first; returns them.
REQUEUE_LIST = """
local moved = {}
while true do
  local msg = redis.call('RPOP', KEYS[1])
  if not msg then break end
  redis.call('RPUSH', KEYS[2], msg)
  moved[#moved + 1] = msg
end
return moved
"""

# KEYS: consumer heartbeat key, consumer's list index, queue, consumers zset.
# ARGV: identity.  Only acts when the heartbeat key is gone (the consumer
# is dead) and nobody recovered it yet; returns the messages moved back.
RECOVER_CONSUMER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local moved = {}
for _, list in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  while true do
    local msg = redis.call('RPOP', list)
    if not msg then break end
    redis.call('RPUSH', KEYS[3], msg)
    moved[#moved + 1] = msg
  end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[1])
return moved
"""


class Delivery:
    def __init__(self, storage):
        self.storage = storage
        self.keys = storage.keys
        conn = storage.conn
        self._requeue = conn.register_script(REQUEUE_LIST)
        self._recover = conn.register_script(RECOVER_CONSUMER)

    def requeue_list(self, inflight_key, reason):
        moved = self._requeue(keys=[inflight_key, self.storage.queue_key])
        if moved:
            hooks.call(hooks.on_requeued, self.storage, moved, reason)
        return len(moved or ())

    def requeue_consumer(self, identity, reason):
        """Put back everything a consumer identity holds (used at its own
        start and stop)."""
        total = 0
        lists = self.storage.conn.smembers(self.keys.consumer_lists(identity))
        for key in sorted(lists):
            total += self.requeue_list(key, reason)
        return total

    def recover_dead(self, recovery_timeout, now=None):
        """Requeue the tasks of consumers silent for `recovery_timeout`.
        Returns {identity: messages moved}."""
        now = time.time() if now is None else now
        stale = self.storage.conn.zrangebyscore(
            self.keys.consumers, '-inf', now - recovery_timeout, start=0,
            num=100)
        recovered = {}
        for identity in stale:
            identity = identity.decode() if isinstance(identity, bytes) \
                else identity
            moved = self._recover(keys=[
                self.keys.consumer(identity),
                self.keys.consumer_lists(identity), self.storage.queue_key,
                self.keys.consumers], args=[identity])
            if moved is None:
                continue  # alive after all, or another consumer was first
            recovered[identity] = len(moved)
            if moved:
                log.warning('consumer %s silent for more than %gs: %d task(s)'
                            ' put back in the queue', identity,
                            recovery_timeout, len(moved))
                hooks.call(hooks.on_requeued, self.storage, moved, 'lost')
        return recovered


def dead_letter_record(raw, reason, detail, task=None, where=None,
                       task_name=None):
    record = {
        'id': uuid.uuid4().hex[:12],
        'reason': reason,
        'detail': detail,
        'at': time.time(),
        'task_id': getattr(task, 'id', None),
        'task_name': task_name,
        'where': where or {},
        'message': base64.b64encode(raw).decode('ascii'),
    }
    return record


def stage_dead_letter(storage, raw, record, inflight_key):
    """Move `raw` from the worker's in-flight list to the dead letters, in
    the worker's next round trip."""
    data = json.dumps(record, sort_keys=True)
    storage.stage_command('LPUSH', storage.keys.dead, data)
    storage.stage_command('LREM', inflight_key, 1, raw)
    if record.get('task_id'):
        storage.stage_command('HDEL', storage.keys.deliveries,
                              record['task_id'])
    hooks.call(hooks.on_dead_letter, storage, record)
