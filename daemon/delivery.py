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

from redis.exceptions import ResponseError

from . import hooks, redisconn
from .storage import CANCELED_LUA, PRIORITY_LUA, message_data

log = logging.getLogger('huey_worker.delivery')

# hw_drain: every message of an in-flight list back where its priority
# says (hw_put_back), one of a cancelled task dropped instead; appends to
# the `moved` and `dropped` tables.  Shared by the scripts below.
DRAIN_LUA = PRIORITY_LUA + CANCELED_LUA + r"""
local function hw_drain(list, queue, set, prefix, moved, dropped)
  while true do
    local msg = redis.call('RPOP', list)
    if not msg then return end
    if hw_canceled(prefix, msg) then
      dropped[#dropped + 1] = msg
    elseif hw_put_back(queue, set, msg) then
      moved[#moved + 1] = msg
    end
  end
end
"""

# KEYS: inflight list, queue, priority set.  ARGV: the cancel marks'
# prefix (Keys.cancel_message_prefix).  Moves every message back to the
# head of the queue (the end BRPOPLPUSH takes from), oldest first, a
# priority message into the priority set with the place it had (the
# marker stays above the plain ones, so waiting priorities still go
# first).  A marker a worker held is dropped: the set gets one at the
# head of the list while it holds messages.  The message of a task an
# operator cancelled is dropped (storage.CANCELED_LUA): never delivered
# again.  Returns {moved, dropped}.
REQUEUE_LIST = DRAIN_LUA + """
local moved, dropped = {}, {}
hw_unmark(KEYS[2])
hw_drain(KEYS[1], KEYS[2], KEYS[3], ARGV[1], moved, dropped)
hw_mark(KEYS[2], KEYS[3])
return {moved, dropped}
"""

# KEYS: consumer heartbeat key, consumer's list index, queue, consumers
# zset, priority set.  ARGV: identity, the cancel marks' prefix.  Only
# acts when the heartbeat key is gone (the consumer is dead: the key's
# expiry is Redis's clock, no host's) and nobody recovered it yet; returns
# {moved, dropped} as REQUEUE_LIST does.
RECOVER_CONSUMER = DRAIN_LUA + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local moved, dropped = {}, {}
hw_unmark(KEYS[3])
for _, list in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  hw_drain(list, KEYS[3], KEYS[5], ARGV[2], moved, dropped)
end
hw_mark(KEYS[3], KEYS[5])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[1])
return {moved, dropped}
"""

# KEYS: an in-flight list, the heartbeat key of the consumer it is named
# after, consumers zset, orphan hash, queue, priority set.  ARGV: that
# identity, grace (ms), the cancel marks' prefix.  A list whose consumer neither heartbeats nor is
# registered (recovered already, or stopped) and that still holds messages
# was filled after its consumer was recovered: by a worker of a consumer
# that stalled past recovery_timeout, or by a blocking read Redis served
# late.  It is put back once it has been seen so for `grace` by Redis's
# clock (TIME), so a consumer between its start and its first heartbeat
# is never robbed; returns {moved, dropped} as REQUEUE_LIST does, or
# false.
REQUEUE_ORPHAN = """
if redis.replicate_commands then redis.replicate_commands() end
""" + DRAIN_LUA + """
if redis.call('EXISTS', KEYS[2]) == 1 or
    redis.call('ZSCORE', KEYS[3], ARGV[1]) or
    redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('HDEL', KEYS[4], KEYS[1])
  return false
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(redis.call('HGET', KEYS[4], KEYS[1]))
if not since then
  redis.call('HSET', KEYS[4], KEYS[1], now)
  return false
end
if now - since < tonumber(ARGV[2]) then return false end
redis.call('HDEL', KEYS[4], KEYS[1])
local moved, dropped = {}, {}
hw_unmark(KEYS[5])
hw_drain(KEYS[1], KEYS[5], KEYS[6], ARGV[3], moved, dropped)
hw_mark(KEYS[5], KEYS[6])
return {moved, dropped}
"""

# KEYS: a worker's in-flight list.  ARGV: the message, then commands, each
# as its argument count followed by its arguments.  The ack of a delivery
# with its outcome, fenced: the message leaves the list and the commands
# (the outcome's writes) run only if it was still there; if a peer took
# it back (this consumer presumed dead), nothing is written and the reply
# is an error starting with FENCED_REPLY.  A command that fails does not
# stop the others (as in MULTI/EXEC); the first error is the reply.  The
# LREM is the script's first write, so a Redis refusing writes (READONLY,
# MISCONF, min-replicas) refuses it whole, and under maxmemory the rest
# is let through once it began (Redis stops no script half-way).
FENCED_REPLY = 'HWFENCED'
ACK_IF_HELD = r"""
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return redis.error_reply('%s the message left the in-flight list')
end
local failed
local i, n = 2, #ARGV
while i <= n do
  local count = tonumber(ARGV[i])
  local reply = redis.pcall(unpack(ARGV, i + 1, i + count))
  if failed == nil and type(reply) == 'table' and reply.err then
    failed = reply
  end
  i = i + count + 1
end
if failed then return failed end
return 1
""" % FENCED_REPLY
# What cannot run inside a script; command names seen to be fine.
_UNSCRIPTABLE = frozenset(('EVAL', 'EVALSHA', 'EVAL_RO', 'EVALSHA_RO',
                           'FCALL', 'FCALL_RO', 'MULTI', 'EXEC', 'WATCH'))
_scriptable = set()


def guarded_ack(inflight_key, raw, commands):
    """One command (an argument tuple, ACK_IF_HELD) that takes `raw` out
    of `inflight_key` and runs `commands` (argument tuples; the LREM of
    `raw` among them is left out) only if it was there.  None when one of
    them is no plain command: a script (none can run in another), a name
    of two words, a callable not yet made commands."""
    ack = ('LREM', inflight_key, 1, raw)
    args = ['EVAL', ACK_IF_HELD, 1, inflight_key, raw]
    add, extend = args.append, args.extend
    for command in commands:
        if type(command) is not tuple:
            return None
        name = command[0]
        if name not in _scriptable:
            if ' ' in name or name.upper() in _UNSCRIPTABLE:
                return None
            _scriptable.add(name)
        if command != ack:
            add(len(command))
            extend(command)
    return tuple(args)


def fenced(error):
    """Whether `error` is ACK_IF_HELD's refusal (the message was no longer
    in the in-flight list)."""
    return isinstance(error, ResponseError) and \
        redisconn.error_code(error) == FENCED_REPLY


# SCAN's COUNT hint, and the SCAN calls of one heartbeat's orphan sweep
# step: a full pass over a keyspace of K keys takes K / (COUNT * CALLS)
# heartbeats; each call costs Redis about a millisecond.
SCAN_COUNT = 1000
SWEEP_CALLS_PER_BEAT = 4
# Consumers looked at per heartbeat for being dead.
MAX_CONSUMERS = 1000


def _glob_escape(text):
    """`text` matched literally in a SCAN MATCH pattern."""
    return ''.join('\\' + c if c in '*?[]\\' else c for c in text)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class Delivery:
    """`app`: the Huey app whose tasks the queue holds, to record the end
    of a cancelled task whose message a put-back dropped (without it the
    record is left as it is)."""

    def __init__(self, storage, app=None):
        self.storage = storage
        self.app = app
        self.keys = storage.keys
        conn = storage.conn
        self._requeue = conn.register_script(REQUEUE_LIST)
        self._recover = conn.register_script(RECOVER_CONSUMER)
        self._orphan = conn.register_script(REQUEUE_ORPHAN)
        self._sweep_cursor = 0
        self._pass_ended = None   # monotonic: when the last sweep pass ended

    def requeue_list(self, inflight_key, reason):
        moved = self._split(self._requeue(
            keys=[inflight_key, self.storage.queue_key,
                  self.storage.priority_key],
            args=[self.keys.cancel_message_prefix]))
        if moved:
            hooks.call(hooks.on_requeued, self.storage, _huey_messages(moved),
                       reason)
        return len(moved or ())

    def _split(self, reply):
        """The messages a put-back script moved ({moved, dropped}, or
        false: None); those it dropped, of cancelled tasks, are recorded
        canceled (record_canceled)."""
        if not reply:
            return None
        moved, dropped = reply
        if dropped:
            self.record_canceled(dropped)
        return list(moved)

    def record_canceled(self, dropped):
        """Record the end of the cancelled tasks whose messages (`dropped`,
        as the queue holds them) a put-back dropped: the journal's outcome
        `canceled` (hooks.on_outcome), their cancel mark and delivery count
        deleted, in one write.  Returns how many were recorded."""
        storage, keys = self.storage, self.keys
        recorded = 0
        for raw in dropped:
            data = message_data(raw)
            task = None
            if self.app is not None:
                try:
                    task = self.app.deserialize_task(data)
                except Exception:
                    task = None
            task_id = task.id if task is not None else \
                peek_message(data).task_id
            log.warning('task %s was cancelled: its message is dropped, not '
                        'put back in the queue', task_id or '(id unknown)')
            if task_id is None:
                continue
            storage.stage_command('DEL', keys.cancel(task_id))
            storage.stage_command('HDEL', keys.deliveries, task_id)
            if task is not None:
                hooks.call(hooks.on_outcome, storage, task, 'canceled', 0.0)
            recorded += 1
        if recorded:
            storage.flush()
        return recorded

    def requeue_consumer(self, identity, reason):
        """Put back everything a consumer identity holds (used at its own
        start and stop): every in-flight list named after it, indexed or
        not (a peer that recovered it deleted its index)."""
        total = 0
        lists = {_text(k) for k in self.storage.conn.smembers(
            self.keys.consumer_lists(identity))}
        lists.update(self.lists_of(identity))
        for key in sorted(lists):
            total += self.requeue_list(key, reason)
        return total

    def lists_of(self, identity):
        """The in-flight list keys named after `identity` (Keys.inflight),
        found by SCAN whatever an index says: a full pass, COUNT
        SCAN_COUNT per call."""
        pattern = '%s*' % _glob_escape(self.keys.inflight_prefix(identity))
        return sorted({_text(k) for k in self.storage.conn.scan_iter(
            match=pattern, count=SCAN_COUNT)})

    def recover_dead(self, recovery_timeout):
        """Requeue the tasks of dead consumers: registered ones whose
        heartbeat key expired (no beat for `recovery_timeout` seconds, as
        Redis's clock counts the key's life: host clocks, zones and steps
        play no part), and then one step of the orphan sweep
        (sweep_orphans).  Returns {identity: messages moved}."""
        conn = self.storage.conn
        registered = [_text(i) for i in conn.zrange(
            self.keys.consumers, 0, MAX_CONSUMERS - 1)]
        recovered = {}
        if registered:
            pipe = conn.pipeline(transaction=False)
            for identity in registered:
                pipe.exists(self.keys.consumer(identity))
            beating = pipe.execute()
        for identity, alive in zip(registered, beating if registered
                                   else ()):
            if alive:
                continue
            moved = self._split(self._recover(keys=[
                self.keys.consumer(identity),
                self.keys.consumer_lists(identity), self.storage.queue_key,
                self.keys.consumers, self.storage.priority_key],
                args=[identity, self.keys.cancel_message_prefix]))
            if moved is None:
                continue  # alive after all, or another consumer was first
            # The one that recovered it also sweeps the lists its index
            # missed (one SCAN pass per dead consumer, not one per peer).
            moved = list(moved)
            for key in self.lists_of(identity):
                moved.extend(self._split(self._requeue(keys=[
                    key, self.storage.queue_key,
                    self.storage.priority_key],
                    args=[self.keys.cancel_message_prefix])) or ())
            recovered[identity] = len(moved)
            if moved:
                log.warning('consumer %s silent for more than %gs: %d task(s)'
                            ' put back in the queue', identity,
                            recovery_timeout, len(moved))
                hooks.call(hooks.on_requeued, self.storage,
                           _huey_messages(moved), 'lost')
        for identity, count in self.sweep_orphans(recovery_timeout).items():
            recovered[identity] = recovered.get(identity, 0) + count
        return recovered

    def sweep_orphans(self, grace, calls=SWEEP_CALLS_PER_BEAT):
        """One step of the sweep of in-flight lists whose consumer is gone
        (neither heartbeating nor registered) and which still hold
        messages: each such list is put back once it has been seen so for
        `grace` seconds (REQUEUE_ORPHAN), found by SCAN whatever an index
        says.  A step is at most `calls` SCAN calls, the cursor carries on
        at the next step, and a new pass starts `grace` / 2 after the last
        one ended (so a list is moved within about twice `grace`).
        Returns {identity: messages moved}."""
        if self._sweep_cursor == 0 and self._pass_ended is not None and \
                time.monotonic() - self._pass_ended < grace / 2.0:
            return {}
        conn, keys = self.storage.conn, self.keys
        pattern = _glob_escape(keys.prefix + 'inflight:') + '*'
        moved_by = {}
        for _ in range(calls):
            self._sweep_cursor, found = conn.scan(
                self._sweep_cursor, match=pattern, count=SCAN_COUNT)
            for key, identity in self._orphan_candidates(found):
                moved = self._split(self._orphan(keys=[
                    key, keys.consumer(identity), keys.consumers,
                    keys.inflight_orphans, self.storage.queue_key,
                    self.storage.priority_key],
                    args=[identity, int(grace * 1000),
                          keys.cancel_message_prefix]))
                if moved:
                    log.warning('%d task(s) found in %s, a list of the '
                                'consumer %s that is gone, put back in the '
                                'queue', len(moved), key, identity)
                    hooks.call(hooks.on_requeued, self.storage,
                               _huey_messages(moved), 'lost')
                    moved_by[identity] = moved_by.get(identity, 0) + \
                        len(moved)
            if self._sweep_cursor == 0:
                self._pass_ended = time.monotonic()
                break
        return moved_by

    def _orphan_candidates(self, found):
        """[(key, identity)] of the lists in `found` that REQUEUE_ORPHAN
        must look at: holding messages with no heartbeat of their
        consumer, or marked already (the script clears a stale mark).
        One round trip, so lists of live consumers cost no script."""
        keys = self.keys
        named = [(k, keys.identity_of_inflight(k))
                 for k in map(_text, found)]
        named = [(k, i) for k, i in named if i is not None]
        if not named:
            return []
        pipe = self.storage.conn.pipeline(transaction=False)
        for key, identity in named:
            pipe.exists(keys.consumer(identity))
            pipe.llen(key)
            pipe.hexists(keys.inflight_orphans, key)
        replies = pipe.execute()
        chosen = []
        for n, (key, identity) in enumerate(named):
            beating, length, marked = replies[3 * n:3 * n + 3]
            if marked or (not beating and length):
                chosen.append((key, identity))
        return chosen


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
