"""At-least-once delivery: putting in-flight messages back and setting bad
ones aside.  Each move is one Lua script, so it is atomic: when several
consumers recover the same dead one at the same moment, exactly one of
them moves its messages (the others find the lists empty)."""
import base64
import io
import json
import logging
import pickletools
import time
import uuid
import zlib

from . import hooks
from .storage import PRIORITY_LUA, message_data

log = logging.getLogger('huey_worker.delivery')

# KEYS: inflight list, queue, priority set.  Moves every message back to
# the head of the queue (the end BRPOPLPUSH takes from), oldest first, a
# priority message into the priority set with the place it had (the
# marker stays above the plain ones, so waiting priorities still go
# first); returns them.  A marker a worker held is dropped: the set gets
# one at the head of the list while it holds messages.
REQUEUE_LIST = PRIORITY_LUA + """
local moved = {}
hw_unmark(KEYS[2])
while true do
  local msg = redis.call('RPOP', KEYS[1])
  if not msg then break end
  if hw_put_back(KEYS[2], KEYS[3], msg) then moved[#moved + 1] = msg end
end
hw_mark(KEYS[2], KEYS[3])
return moved
"""

# KEYS: consumer heartbeat key, consumer's list index, queue, consumers
# zset, priority set.  ARGV: identity.  Only acts when the heartbeat key
# is gone (the consumer is dead) and nobody recovered it yet; returns the
# messages moved back (as REQUEUE_LIST puts them).
RECOVER_CONSUMER = PRIORITY_LUA + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local moved = {}
hw_unmark(KEYS[3])
for _, list in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  while true do
    local msg = redis.call('RPOP', list)
    if not msg then break end
    if hw_put_back(KEYS[3], KEYS[5], msg) then moved[#moved + 1] = msg end
  end
end
hw_mark(KEYS[3], KEYS[5])
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
        moved = self._requeue(keys=[inflight_key, self.storage.queue_key,
                                    self.storage.priority_key])
        if moved:
            hooks.call(hooks.on_requeued, self.storage, _huey_messages(moved),
                       reason)
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
                self.keys.consumers, self.storage.priority_key],
                args=[identity])
            if moved is None:
                continue  # alive after all, or another consumer was first
            recovered[identity] = len(moved)
            if moved:
                log.warning('consumer %s silent for more than %gs: %d task(s)'
                            ' put back in the queue', identity,
                            recovery_timeout, len(moved))
                hooks.call(hooks.on_requeued, self.storage,
                           _huey_messages(moved), 'lost')
        return recovered


def _huey_messages(moved):
    """What on_requeued hooks get: Huey's messages, priority prefix off."""
    return [message_data(raw) for raw in moved]


def dead_letter_record(raw, reason, detail, task=None, where=None,
                       task_name=None):
    record = {
        'id': uuid.uuid4().hex[:12],
        'reason': reason,
        'detail': detail,
        'at': time.time(),
        'task_id': getattr(task, 'id', None),
        # The worker sets False for an id read off a message that failed
        # its checks (peek_message): only what the message claims.
        'task_id_verified': True if task is not None else None,
        'task_name': task_name,
        'where': where or {},
        'message': base64.b64encode(raw).decode('ascii'),
    }
    return record


def stage_dead_letter(storage, raw, record, inflight_key):
    """Move `raw` from the worker's in-flight list to the dead letters, in
    the worker's next round trip (the caller sends it)."""
    data = json.dumps(record, sort_keys=True)
    storage.stage_command('LPUSH', storage.keys.dead, data)
    storage.stage_command('LREM', inflight_key, 1, raw)
    # Only a message that was read counted its deliveries; an id read from
    # unverified bytes may name another task's count.
    if record.get('task_id') and record.get('task_id_verified', True):
        storage.stage_command('HDEL', storage.keys.deliveries,
                              record['task_id'])
    hooks.call(hooks.on_dead_letter, storage, record)


# -- what a message that cannot be read says it is ----------------------------

# The id sits at the start of the message: this much of it is enough, and
# no more is decompressed (a small message may inflate to gigabytes).
PEEK_BYTES = 64 * 1024
PEEK_OPS = 64
ID_MAX_CHARS = 200
_MESSAGE_GLOBAL = ('huey.registry', 'Message')
_STRING_OPS = frozenset((
    'SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE',
    'SHORT_BINSTRING', 'BINSTRING', 'STRING'))
# What may stand between the Message global and its first field: memo
# bookkeeping, and protocols 0 and 1's `__builtin__ tuple` argument.
_BETWEEN_OPS = frozenset((
    'MARK', 'MEMOIZE', 'PUT', 'BINPUT', 'LONG_BINPUT', 'FRAME', 'GLOBAL'))


class Peeked:
    """What `peek_message` found: `task_id` and `task_name` (None when
    unknown; then `unknown` says why) and whether the bytes were
    compressed."""

    def __init__(self, task_id=None, task_name=None, unknown=None,
                 compressed=False):
        self.task_id, self.task_name = task_id, task_name
        self.unknown, self.compressed = unknown, compressed


def peek_message(raw):
    """The id and name a Huey message claims, read without unpickling it.

    For messages that failed their signature check or could not be
    decoded: unpickling unverified bytes runs whatever they say.  The
    pickle's opcodes are only walked (pickletools.genops runs nothing):
    a Message is the global huey.registry.Message followed by its fields,
    id first, then the task name.  The signed serializer appends its
    signature after the pickle's end, so the walk needs no unsigning; a
    compressed message (zlib or gzip, as Huey writes them) is inflated
    first, its first PEEK_BYTES only.  What is found is the message's
    claim, not verified."""
    compressed = raw[:1] in (b'\x78', b'\x1f')
    data = raw[:PEEK_BYTES]
    if compressed:
        wbits = zlib.MAX_WBITS | (16 if raw[:1] == b'\x1f' else 0)
        try:
            data = zlib.decompressobj(wbits).decompress(raw, PEEK_BYTES)
        except zlib.error:
            return Peeked(unknown='the message is neither a pickle nor '
                                  'compressed data')
    fields, found, recent = [], False, []
    try:
        for count, (op, arg, _) in enumerate(
                pickletools.genops(io.BytesIO(data))):
            if count >= PEEK_OPS:
                break
            name = op.name
            if not found:
                if name == 'GLOBAL':
                    found = tuple(arg.split(' ', 1)) == _MESSAGE_GLOBAL
                elif name == 'STACK_GLOBAL':
                    found = tuple(recent[-2:]) == _MESSAGE_GLOBAL
                elif name in _STRING_OPS:
                    recent.append(arg)
                continue
            if name in _STRING_OPS:
                fields.append(arg)
                if len(fields) == 2:
                    break
            elif name not in _BETWEEN_OPS:
                break
    except Exception:
        # Untrusted bytes: anything genops chokes on (truncated, not a
        # pickle) just ends the walk.
        pass
    if not found:
        return Peeked(unknown='the message is not a pickled Huey message',
                      compressed=compressed)
    task_id = fields[0] if fields and _plain(fields[0]) else None
    if task_id is None:
        return Peeked(unknown='the id of the pickled Huey message is not '
                              'readable', compressed=compressed)
    name = fields[1] if len(fields) > 1 and _plain(fields[1]) else None
    return Peeked(task_id, name, compressed=compressed)


def _plain(value):
    return isinstance(value, str) and 0 < len(value) <= ID_MAX_CHARS and \
        value.isprintable()
