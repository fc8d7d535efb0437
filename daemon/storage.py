"""Huey's Redis storage, extended for crash-safe delivery and piggybacking.

Three additions to RedisExpireStorage:

* `dequeue_into(inflight_key)`: the message moves atomically from the queue
  into the worker's in-flight list (BRPOPLPUSH, Redis 5 compatible), so a
  worker that dies leaves it where it can be found.
* Task priorities (Huey's `priority=`): see "Priorities" below.
* Piggybacked writes: a caller may stage commands (`stage_command()`;
  `stage()` for a Lua script), such as journal updates and the ack, to
  ride on the thread's next round trip, and while `deferring` is on
  every write Huey makes after a task body (result, retry, on_complete) is
  held back and sent with the ack in one MULTI/EXEC.  A read sends what is
  held back first, so Huey never reads stale data.

Priorities.  Plain messages (no priority, or 0) stay on Huey's list,
LPUSHed and taken from the right by BRPOPLPUSH, exactly as without
priorities.  A message with a priority goes to a sorted set instead
(Keys.priority), as Huey's PriorityRedisStorage does: score -priority, so
the highest priority comes first, and FIFO within a priority through the
member itself, which is a NUL byte, a 16-digit sequence number (INCR of
Keys.priority_seq), the priority as text, a NUL byte, then Huey's message.
No Huey message starts with a NUL byte (a pickle, or zlib/gzip data), so any
script can tell a priority message from a plain one by its first byte and
read its priority without unpickling it; the in-flight lists, the schedule
and the dead letters keep that form, so a message put back from any of
them returns to its priority (with its old place, or a new one when it was
delayed).

While the set holds messages, the list holds MARKER at its head (the end
BRPOPLPUSH takes from).  A worker reading the marker, or a priority
message someone pushed on the list, runs TAKE: one script that takes the
best message, by Huey's rule that a plain message counts as priority 0
(higher runs first, so a negative priority runs after the plain
messages), and moves it into the worker's in-flight list in the same
step.  After such a read the worker keeps sending TAKE instead of
BRPOPLPUSH while the set holds messages, so a priority message costs no
more round trips than a plain one; once the set is empty it blocks on the
list again, and the marker wakes it when a priority message arrives.  A
queue without priorities never sees the marker: its hot path is
BRPOPLPUSH as before.  The marker is not a message: queue_size() leaves it
out.
"""
import calendar
import logging
import math
import os
import struct
import threading
import time

import redis
from huey.storage import RedisExpireStorage

from . import redisconn, transaction
from .keys import Keys

log = logging.getLogger('huey_worker.storage')

TAG = b'\x00'
# Keys.layout of an adopted PriorityRedisHuey's queue.
NATIVE_LAYOUT = b'priority-redis-huey'
MARKER = b'\x00priority'
SEQ_DIGITS = 16
_UNSEQUENCED = b'0' * SEQ_DIGITS

# Shared by every script that moves messages between the queue, the
# priority set, the in-flight lists and the schedule.  hw_score: the score
# of a priority message in the set (nil for plain messages, the marker and
# anything unreadable).  hw_enqueue: a priority message into the set
# behind those of its priority already there (a new sequence number).
# hw_mark: the marker at the head of the list exactly while the set holds
# messages (call it after changing the set).  hw_unmark: take a marker off
# the head (put back with hw_mark once messages were pushed there).
# hw_put_back: a message from an in-flight list back where it came from,
# a priority one with its old place.
PRIORITY_LUA = r"""
local HW_MARKER = '\0priority'
local function hw_score(m)
  if string.byte(m, 1) ~= 0 or m == HW_MARKER then return nil end
  local stop = string.find(m, '\0', 18, true)
  if not stop then return nil end
  local p = tonumber(string.sub(m, 18, stop - 1))
  if not p then return nil end
  return -p
end
local function hw_enqueue(set, seq, m, score)
  redis.call('ZADD', set, score, string.sub(m, 1, 1) .. string.format(
    '%016d', redis.call('INCR', seq)) .. string.sub(m, 18))
end
local function hw_mark(list, set)
  local left = redis.call('ZCARD', set)
  local head = redis.call('LINDEX', list, -1)
  if left > 0 then
    if head ~= HW_MARKER then redis.call('RPUSH', list, HW_MARKER) end
  elseif head == HW_MARKER then
    redis.call('RPOP', list)
  end
  return left
end
local function hw_unmark(list)
  if redis.call('LINDEX', list, -1) == HW_MARKER then
    redis.call('RPOP', list)
  end
end
local function hw_put_back(list, set, m)
  if m == HW_MARKER then return false end
  local score = hw_score(m)
  if score then
    redis.call('ZADD', set, score, m)
  else
    redis.call('RPUSH', list, m)
  end
  return true
end
"""

# KEYS: list, priority set, sequence.  ARGV: the message, as tag_message
# makes it.
ENQUEUE = PRIORITY_LUA + r"""
hw_enqueue(KEYS[2], KEYS[3], ARGV[1], hw_score(ARGV[1]))
hw_mark(KEYS[1], KEYS[2])
return 1
"""

# KEYS: list, priority set, the worker's in-flight list.  ARGV: what the
# worker's BRPOPLPUSH just moved into its in-flight list when that was the
# marker or a priority message, else ''.  Moves the best message into the
# in-flight list: a priority above 0 first, then the list, then what is
# left in the set (priorities below 0); a priority message found on the
# list goes into the set on the way.  Returns {message or false, how many
# the set still holds}.  The common case (a priority above 0 waiting, read
# without BRPOPLPUSH first) is ZPOPMIN, LPUSH and ZCARD: it leaves the
# list, and so its marker, alone.
TAKE_BODY = r"""
local list, set, inflight = KEYS[1], KEYS[2], KEYS[3]
local held = ARGV[1]
local touched = held ~= ''
if touched then
  if held == HW_MARKER then
    redis.call('LREM', inflight, 1, held)
  else
    local score = hw_score(held)
    if not score then
      -- Not readable: it stays in flight for the worker to set aside.
      return {held, redis.call('ZCARD', set)}
    end
    redis.call('LREM', inflight, 1, held)
    redis.call('ZADD', set, score, held)
  end
end
local msg = false
while true do
  local best = redis.call('ZPOPMIN', set)
  if best[1] and tonumber(best[2]) < 0 then
    msg = best[1]
    break
  end
  -- Nothing above priority 0 in the set: the list first.
  touched = true
  local head = redis.call('RPOP', list)
  while head == HW_MARKER do head = redis.call('RPOP', list) end
  if not head then
    msg = best[1] or false
    break
  end
  if best[1] then redis.call('ZADD', set, best[2], best[1]) end
  local score = hw_score(head)
  if not score then
    msg = head
    break
  end
  redis.call('ZADD', set, score, head)   -- pushed on the list: file it
end
if msg then redis.call('LPUSH', inflight, msg) end
local left
if touched then
  left = hw_mark(list, set)
else
  left = redis.call('ZCARD', set)
  if left == 0 then hw_unmark(list) end
end
return {msg, left}
"""
TAKE = PRIORITY_LUA + TAKE_BODY

# KEYS: list, priority set, the worker's in-flight list, Huey's sorted set
# (an adopted PriorityRedisHuey's queue).  ARGV: as TAKE.  Huey's set
# stays the queue its producers see (their pending_count(), pending() and
# flush() stay true): its best message is compared with the best the
# suite's list and priority set hold (messages put back, retries and
# delayed tasks come due, periodic tasks) and taken from there when it
# ranks strictly higher, the suite's being older on a tie; else TAKE.
# A message taken from Huey's set goes in flight in the suite's form:
# plain, or tagged with its priority (%.17g: every double exactly, inf
# too, as Lua's tonumber reads it back).
BRIDGE_TAKE = PRIORITY_LUA + r"""
local top = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if top[1] then
  local score = tonumber(top[2])
  local mine = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local ranked = mine[1] and tonumber(mine[2])
  local plain = redis.call('LLEN', KEYS[1])
  if plain > 0 and redis.call('LINDEX', KEYS[1], -1) == HW_MARKER then
    plain = plain - 1
  end
  local best = ranked
  if plain > 0 and (not ranked or ranked >= 0) then best = 0 end
  if not best or score < best then
    redis.call('ZREM', KEYS[4], top[1])
    local data = string.sub(top[1], 9)
    local msg = data
    if score ~= 0 then
      msg = '\0' .. string.rep('0', 16) .. string.format('%.17g', -score)
        .. '\0' .. data
    end
    redis.call('LPUSH', KEYS[3], msg)
    return {msg, 0}
  end
end
""" + TAKE_BODY

# KEYS: Huey's sorted set, the wake-up list.  ARGV: member (Huey's time
# prefix and message), score (-priority).  An enqueue in Huey's own form,
# so the suite's producers and plain PriorityRedisHuey ones share one
# order, and a token that wakes one idle worker at once.
NATIVE_ENQUEUE = r"""
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 63)
redis.call('EXPIRE', KEYS[2], 60)
return 1
"""

# hw_canceled: whether `m` is the message of a task an operator cancelled
# (daemon/actions/cancel.py): its mark, `prefix` (Keys.cancel_message_
# prefix) followed by its SHA-1, exists.  The mark is deleted: the caller
# drops the message instead of putting it back, and records the end.
CANCELED_LUA = r"""
local function hw_canceled(prefix, m)
  if not prefix or prefix == '' then return false end
  return redis.call('DEL', prefix .. redis.sha1hex(m)) == 1
end
"""

# KEYS: the worker's in-flight list, list, priority set.  ARGV: message,
# the cancel marks' prefix.  A message whose run was cut short goes back:
# a plain one to the head of the list (under the marker, so waiting
# priorities still go first), a priority one into the set with its place;
# one of a cancelled task leaves the in-flight list only (returns 0).
PUT_BACK = PRIORITY_LUA + CANCELED_LUA + r"""
redis.call('LREM', KEYS[1], 1, ARGV[1])
if hw_canceled(ARGV[2], ARGV[1]) then return 0 end
hw_unmark(KEYS[2])
hw_put_back(KEYS[2], KEYS[3], ARGV[1])
hw_mark(KEYS[2], KEYS[3])
return 1
"""


def priority_text(priority, infinite=False):
    """The priority as a priority message holds it: one spelling per
    number (5, 5.0 and True are all b'5'), which Lua's tonumber reads.
    ValueError for anything but a finite number; with `infinite`, for a
    message already accepted (a plain PriorityRedisHuey producer may give
    inf, which Huey and Redis take), ±inf is b'inf' / b'-inf'."""
    # A number, not a numeric string: Huey compares priorities as given.
    try:
        if isinstance(priority, (str, bytes)):
            raise TypeError
        value = float(priority)
    except (TypeError, ValueError, OverflowError):
        raise ValueError('a task priority must be a finite number, not %r'
                         % (priority,))
    if math.isinf(value) and infinite:
        return b'inf' if value > 0 else b'-inf'
    if not math.isfinite(value):
        raise ValueError('a task priority must be a finite number, not %r'
                         % (priority,))
    if value.is_integer() and abs(value) < 2 ** 53:
        return b'%d' % value
    return repr(value).encode('ascii')


def priority_text_value(priority, infinite=False):
    """The priority as the number a priority message holds (ValueError as
    priority_text)."""
    return float(priority_text(priority, infinite))


def tag_message(data, priority, seq=None, infinite=False):
    """`data` in the form the priority set (and the schedule) holds it;
    without `seq`, numbered 0 (scripts number it as it enters the set).
    `infinite`: as priority_text."""
    return b''.join((TAG, _UNSEQUENCED if seq is None else
                     b'%0*d' % (SEQ_DIGITS, seq),
                     priority_text(priority, infinite), TAG, data))


def is_priority_message(raw):
    return raw[:1] == TAG and raw != MARKER and \
        raw.find(TAG, SEQ_DIGITS + 1) > 0


def message_data(raw):
    """Huey's message inside `raw`: raw itself unless it is a priority
    message (anything unreadable is left as it is, to be set aside)."""
    if raw[:1] != TAG:
        return raw
    stop = raw.find(TAG, SEQ_DIGITS + 1)
    return raw if stop < 0 else raw[stop + 1:]


def message_priority(raw):
    """The priority a message in the queue has: 0 for plain ones."""
    if not is_priority_message(raw):
        return 0
    text = raw[SEQ_DIGITS + 1:raw.find(TAG, SEQ_DIGITS + 1)]
    value = float(text)
    return int(value) if value.is_integer() else value


class SuiteStorage(RedisExpireStorage):
    priority = True   # as Huey's priority storages say of themselves

    def __init__(self, name='huey', expire_time=604800, **kwargs):
        super().__init__(name, expire_time=expire_time, **kwargs)
        # The name as configured ('pdf-tasks'): Huey's keys use it cleaned
        # of everything but letters and digits (self.name, 'pdftasks').
        self.queue_name = name
        self.keys = Keys(self.name)
        self.priority_key = self.keys.priority
        self._local = threading.local()
        self._take = self.conn.register_script(TAKE)
        # A producer's connections (_check_out): parked ones, every one
        # made for parking, the process they belong to.
        self._parked, self._parking = [], set()
        self._parked_pid = os.getpid()
        self._parking_lock = threading.Lock()
        self._parking_closed = False

    # -- piggybacking -------------------------------------------------------

    def _pending(self):
        pending = getattr(self._local, 'pending', None)
        if pending is None:
            pending = self._local.pending = []
        return pending

    def stage(self, command):
        """Queue `command(pipe)` to be sent with this thread's next round trip."""
        self._pending().append(command)

    def stage_command(self, *args):
        """Queue one Redis command, given as its arguments (str, bytes, int
        or float), for this thread's next round trip.  The cheap form for
        the hot path: the reply is never looked at, so it skips redis-py's
        command methods (a microsecond each, and a task stages ~20)."""
        self._pending().append(args)

    def stage_commands(self, commands):
        """stage_command for several commands (argument tuples) at once."""
        self._pending().extend(commands)

    @property
    def deferring(self):
        return getattr(self._local, 'deferring', False)

    @deferring.setter
    def deferring(self, value):
        self._local.deferring = value

    def is_staged(self, command):
        """Whether `command` (as given to stage) waits to be sent."""
        return any(c is command for c in self._pending())

    def unstage(self, command):
        """Take `command` (as given to stage) back, if it still waits."""
        pending = self._pending()
        for i, staged in enumerate(pending):
            if staged is command:
                del pending[i]
                return

    def has_pending(self):
        return bool(getattr(self._local, 'pending', None))

    def flush(self, last=None):
        """Send staged commands (and `last`) in one MULTI/EXEC round trip.

        Returns the reply of `last`.  On a Redis error the staged commands
        are kept, so the caller may retry the whole flush after reconnecting.
        """
        pending = self._pending()
        if not pending and not self._durable_ms():
            return last(self.conn) if last is not None else None
        if not pending and last is None:
            return None
        return self.flush_all(last)[-1]

    def flush_all(self, *extra, durable=True):
        """Like flush, but returns the replies of every command sent (those
        of the staged commands raw: nobody reads them, so redis-py's
        response callbacks are spared; those of `extra`, argument tuples
        or callables as for stage, as redis-py gives them).

        Called without arguments, as Huey's flush() does, it is Huey's
        flush_all: the queue (plain and priority messages), the schedule,
        the results and the counters are deleted.  `durable=False`: no
        WAIT under [redis] durable_writes, for a write a later WAIT on the
        same connection covers (WAIT counts every write sent before it)."""
        if not extra:
            self.flush()
            return super().flush_all()
        pending = self._pending()
        pipe = self._record(pending)
        staged = len(pipe.command_stack)
        self._record([c for c in extra if c is not None], pipe)
        durable = self._durable_ms() if durable else 0
        if not durable:
            results = transaction.execute(
                pipe, self._own_connection(),
                wanted=len(pipe.command_stack) - staged)
            pending.clear()
            return results
        # [redis] durable_writes: WAIT on the connection that wrote, so an
        # enqueue or an ack counts as done only once a replica has it.
        conn = self._own_connection()
        pool = self.pool if conn is None else None
        if pool is not None:
            conn = pool.get_connection()
        try:
            results = transaction.execute(
                pipe, conn, wanted=len(pipe.command_stack) - staged)
            pending.clear()
            self._wait_replica(conn, durable, acknowledged=pool is not None)
        finally:
            if pool is not None:
                pool.release(conn)
        return results

    def _durable_ms(self):
        return getattr(self.pool, 'durable_wait_ms', 0)

    @staticmethod
    def _wait_replica(conn, ms, acknowledged):
        """WAIT for one replica to hold this connection's writes, up to
        `ms`.  When none confirms in time the connection is dropped (so
        the next command asks Sentinel where the primary is: this one may
        have been demoted while alive, its new writes bound to be lost);
        then, for a write someone is told about (`acknowledged`: an
        enqueue, an operator's action, the scheduler's moves) NotReplicated
        is raised: the write is not acknowledged.  A worker's ack (on its
        own pinned connection) only warns: the outcome is on the primary,
        and if a failover drops it the message is back in flight there
        and runs again."""
        if transaction.command(conn, 'WAIT', 1, ms):
            return
        conn.disconnect()
        text = ('no replica confirmed a write within %dms ([redis] '
                'durable_writes)' % ms)
        if acknowledged:
            raise redisconn.NotReplicated(
                text + ': not acknowledged; it may or may not survive a '
                'failover')
        log.warning('%s: a failover now could lose it', text)

    def _record(self, commands, pipe=None):
        """A pipeline holding `commands`: argument tuples, or callables
        that call command methods on the pipeline."""
        if pipe is None:
            pipe = self.conn.pipeline(transaction=True)
        stack = pipe.command_stack
        for command in commands:
            if type(command) is tuple:
                stack.append((command, {}))
            else:
                command(pipe)
        return pipe

    def prime(self, values):
        """Remember replies already fetched (revocation keys read with the
        worker's delivery round trip) so Huey's next read of them is free."""
        self._local.primed = values

    def _alone(self, command, script=None):
        """Send `command` (an argument tuple) as the only command of a
        round trip; its raw reply (no redis-py response callback).
        `script`: the Lua text of an EVALSHA `command`, sent again as EVAL
        when Redis does not know it (NoScriptError: nothing ran).
        Straight on the connection, for a producer's enqueue: redis-py's
        command methods cost more Python than the LPUSH costs Redis.
        Under [redis] durable_writes a WAIT follows, as for flush.  Redis
        errors are raised.  On a parked connection, or the pool's
        (_check_out)."""
        conn = self._check_out()
        try:
            try:
                try:
                    reply = transaction.command(conn, *command)
                except redis.exceptions.NoScriptError:
                    if script is None:
                        raise
                    reply = transaction.command(conn, 'EVAL', script,
                                                *command[2:])
            except redis.exceptions.ResponseError as exc:
                # Redis before 7: a READONLY or OOM the script met, told
                # as such (retry_readonly, redisconn.unavailable).
                typed = redisconn.unwrap_script_error(exc)
                if typed is exc:
                    raise
                raise typed from None
            durable = self._durable_ms()
            if durable:
                self._wait_replica(conn, durable, acknowledged=True)
        finally:
            self._check_in(conn)
        return reply

    # Whether enqueue() of a message without priority is an LPUSH on
    # queue_key, and nothing else: a producer's record may then ride it
    # as one script (journal.Journal.enqueue_recorded).
    enqueue_is_lpush = True

    def send_enqueue(self, command, script=None):
        """A producer's enqueue made as one command (an argument tuple; an
        EVALSHA of `script` carrying the journal's record), sent alone
        (_alone), a refusal by a replica being promoted retried
        (redisconn.retry_readonly).  With writes staged on this thread
        (a handler of the enqueue signal made them), in their MULTI
        instead, as EVAL of `script` (a MULTI cannot fall back on a
        NOSCRIPT).  Redis errors are raised; nothing is written then."""
        if self.has_pending() or self.deferring:
            if script is not None:
                command = ('EVAL', script) + tuple(command[2:])
            return self._write(*command)
        return redisconn.retry_readonly(lambda: self._alone(command, script))

    # -- a producer's parked connections ------------------------------------
    #
    # redis-py 8's checkout and release (two lock rounds, a readiness
    # poll, four updates of the pool's connection counters) cost a
    # producer some 10 us of an 80 us enqueue.  Up to PARKED_MAX
    # connections of the storage's own stay parked here between enqueues
    # instead, shared by the process's threads: list.pop and append need
    # no lock, and a signal handler that enqueues in the middle of an
    # enqueue takes another one.  Made beside the pool, with its settings,
    # not taken from it: the pool's max_connections stays whole for the
    # app's other calls (result reads, Huey's own).  More enqueues at once
    # than that take the pool's, as before.

    PARKED_MAX = 4

    def _check_out(self):
        """A connection for a command sent alone, ready for it
        (redisconn.ready): a parked one, a new one to park while fewer
        than PARKED_MAX exist, else the pool's."""
        if self._parked_pid != os.getpid():
            # A forked child: the parent's sockets are the parent's (and
            # its lock may have been held by a thread the fork left out).
            self._parked, self._parking = [], set()
            self._parking_lock = threading.Lock()
            self._parked_pid = os.getpid()
        try:
            conn = self._parked.pop()
        except IndexError:
            conn = self._new_parked_connection()
            if conn is None:
                return self.pool.get_connection()
        try:
            return redisconn.ready(conn)
        except BaseException:
            self._check_in(conn)   # dropped: it reconnects when next taken
            raise

    def _new_parked_connection(self):
        with self._parking_lock:
            if len(self._parking) >= self.PARKED_MAX or self._parking_closed:
                return None
            pool = self.pool
            conn = pool.connection_class(**pool.connection_kwargs)
            self._parking.add(conn)
            return conn

    def _check_in(self, conn):
        """Park `conn` again, or give it back to the pool it came from."""
        if conn not in self._parking:
            self.pool.release(conn)
        elif self._parking_closed:
            self._parking.discard(conn)
            conn.disconnect()
        else:
            self._parked.append(conn)

    def disconnect(self):
        """Close every connection of this storage for good, the app having
        a new one: the pool's (those in use too, as redis-py's
        disconnect() does) and the parked ones (those in use as they come
        back; none is parked again)."""
        self.pool.disconnect()
        self._parking_closed = True
        for conn in list(self._parking):
            conn.disconnect()

    def _lpush_carrier(self):
        """The staged write that offers to carry a plain LPUSH (its
        with_lpush(queue_key, message) gives the combined write, as
        send_enqueue's (command, script)), when it is all this thread has
        staged and nothing is held back; else None."""
        pending = getattr(self._local, 'pending', None)
        if not pending or len(pending) != 1 or self.deferring:
            return None
        staged = pending[0]
        return staged if hasattr(staged, 'with_lpush') else None

    def discard_pending(self):
        self._pending().clear()

    def _write(self, *args):
        """One write Huey makes (a command as its arguments): held back
        while deferring, else sent at once with whatever is staged."""
        if self.deferring:
            self._pending().append(args)
            return None
        return redisconn.retry_readonly(
            lambda: self.flush(lambda c: c.execute_command(*args)))

    def _read(self, last):
        """Like flush, for a read: with nothing staged it is sent alone,
        with no WAIT under [redis] durable_writes (a read needs no
        replica; a replica that is down must not fail the producers'
        result reads)."""
        if not self._pending():
            return last(self.conn)
        return self.flush(last)

    # -- a worker's own connection ------------------------------------------

    def pin_connection(self):
        """Let this thread keep one connection for its round trips (the
        worker's dequeue and transactions) instead of taking one from the
        pool each time: the pool's checkout (a lock and a readiness poll)
        cost as much as a command.  Taken on first use, so Redis being down
        now is no error; threads that never ask use the pool as before."""
        self._local.wants_own = True

    def unpin_connection(self):
        local = self._local
        conn = getattr(local, 'own', None)
        local.wants_own = False
        local.own = None
        if conn is not None:
            if getattr(local, 'prefetch', None):
                conn.disconnect()   # a reply is still on its way
            local.prefetch = local.prefetched = None
            self.pool.release(conn)

    def _own_connection(self):
        local = self._local
        conn = getattr(local, 'own', None)
        if conn is None and getattr(local, 'wants_own', False):
            conn = local.own = self.pool.get_connection()
        if conn is not None and getattr(local, 'prefetch', None):
            # A queue read is on its way on this connection: take its
            # reply before anything else is sent (dequeue_into returns it).
            local.prefetch = None
            local.prefetched = (self._read_reply(conn),)
        return conn

    def watch_in_flight(self, inflight_key, raw):
        """Fencing a worker's outcome: whether `raw` is still in its
        in-flight list `inflight_key` (False: a peer presumed this consumer
        dead and put the message back).  When True the list stays WATCHed
        on this thread's own connection, so the next MULTI/EXEC there (the
        ack) is refused (redis WatchError) if the list changes first; when
        False it is UNWATCHed.  Without an own connection (not pinned) only
        the check.  One round trip; Redis errors are raised."""
        conn = self._own_connection()
        if conn is None:
            return raw in self.conn.lrange(inflight_key, 0, -1)
        try:
            conn.send_packed_command(transaction.pack(conn, [
                ('WATCH', inflight_key), ('LRANGE', inflight_key, 0, -1)]))
            conn.read_response()
            held = raw in conn.read_response()
            if not held:
                conn.send_command('UNWATCH')
                conn.read_response()
        except BaseException:
            conn.disconnect()   # a WATCH or a reply may be left behind
            raise
        return held

    @staticmethod
    def _read_reply(conn):
        """The reply of a queue read sent earlier; a TAKE Redis did not
        know (its script cache was flushed, e.g. by a restart) answers
        NoScriptError, kept to be sent again: it moved nothing."""
        try:
            return transaction.read(conn)
        except redis.exceptions.NoScriptError as exc:
            return exc

    def flush_and_prefetch(self, inflight_key, timeout):
        """Send what is staged in one MULTI/EXEC and, in the same write, the
        next queue read: a worker's ack and its next dequeue share one
        round trip.  The read's reply is for the next dequeue_into().
        Without a connection of its own the thread just flushes.  On any
        error the read may or may not have moved a message into
        `inflight_key`; the staged commands are kept for a retry."""
        conn = self._own_connection()
        if conn is None or self._durable_ms():
            # durable_writes: the ack's WAIT comes before any next read.
            return self.flush()
        pending = self._pending()
        pipe = self._record(pending)
        transaction.execute(pipe, conn, then=self._dequeue_command(
            inflight_key, timeout), wanted=0)
        pending.clear()
        self._local.prefetch = inflight_key
        return None

    def prefetch_pending(self):
        """Whether a queue read sent by flush_and_prefetch awaits its
        reply (or holds one) on this thread."""
        local = self._local
        return bool(getattr(local, 'prefetch', None)
                    or getattr(local, 'prefetched', None))

    # -- crash-safe dequeue -------------------------------------------------

    def dequeue_into(self, inflight_key, timeout):
        """Block up to `timeout` seconds for a message; it lands in
        `inflight_key` as well as being returned (in the form the queue
        holds it: message_data() is Huey's message).  None when nothing
        came, which may be early: after the priority set ran empty."""
        local = self._local
        if getattr(local, 'prefetch', None) == inflight_key:
            local.prefetch = None
            return self._received(self._read_reply(local.own), inflight_key)
        prefetched = getattr(local, 'prefetched', None)
        if prefetched is not None:
            local.prefetched = None
            return self._received(prefetched[0], inflight_key)
        conn = self._own_connection()
        if conn is None:
            reply = self.conn.brpoplpush(self.queue_key, inflight_key,
                                         timeout=max(1, int(round(timeout))))
        else:
            try:
                reply = transaction.command(conn, *self._dequeue_command(
                    inflight_key, timeout))
            except redis.exceptions.NoScriptError as exc:
                reply = exc
        return self._received(reply, inflight_key)

    def dequeue(self):
        """Huey's own read (its consumer's: at most once, no in-flight
        list): the list's next message, or, where the list says so, the
        best one by priority."""
        raw = super().dequeue()
        if raw is None or raw[:1] != TAG:
            return raw
        scratch = self.keys.prefix + 'dequeue'
        pipe = self.conn.pipeline(transaction=True)
        self._take(keys=[self.queue_key, self.priority_key, scratch],
                   args=[raw], client=pipe)
        pipe.delete(scratch)
        message = pipe.execute()[0][0]
        return None if message is None else message_data(message)

    def _dequeue_command(self, inflight_key, timeout):
        if getattr(self._local, 'taking', False):
            # The priority set held messages at the last read: ask it
            # first, without blocking.
            return ('EVALSHA', self._take.sha, 3, self.queue_key,
                    self.priority_key, inflight_key, b'')
        return ('BRPOPLPUSH', self.queue_key, inflight_key,
                max(1, int(round(timeout))))

    def _received(self, reply, inflight_key):
        """What a queue read answered, as the message to run (or None)."""
        if type(reply) is bytes:
            if reply[:1] != TAG:
                return reply   # the hot path: a plain message
            # The marker, or a priority message pushed on the list (a
            # dead letter requeued): the set decides what runs.
            reply = self._take_now(inflight_key, reply)
        elif reply is None:
            return None
        elif isinstance(reply, redis.exceptions.NoScriptError):
            reply = self._take_now(inflight_key, b'', cached=False)
        message, left = reply
        self._local.taking = bool(left)
        return message

    def _take_now(self, inflight_key, held, cached=True):
        """TAKE on this thread's connection.  By its hash first; EVAL, which
        caches it again, when Redis does not know it."""
        keys = (self.queue_key, self.priority_key, inflight_key)
        conn = getattr(self._local, 'own', None)
        if conn is None:
            return self._take(keys=keys, args=[held])
        if cached:
            try:
                return transaction.command(conn, 'EVALSHA', self._take.sha,
                                           3, *keys, held)
            except redis.exceptions.NoScriptError:
                pass
        return transaction.command(conn, 'EVAL', TAKE, 3, *keys, held)

    # -- Huey's storage API, routed through the piggyback ------------------

    def enqueue(self, data, priority=None):
        if not priority:
            carrier = self._lpush_carrier()
            if carrier is None:
                self.send_enqueue(('LPUSH', self.queue_key, data))
                return
            # The producer's record staged by the enqueue signal and this
            # LPUSH go as one script (journal ENQUEUE_RECORDED).  Taken
            # off the staged list: on a failure the enqueue raises and
            # there is no record, as with the MULTI.
            self.unstage(carrier)
            self.send_enqueue(*carrier.with_lpush(self.queue_key, data))
            return
        # While the worker defers its writes, this is Huey re-enqueueing
        # the task it runs (a retry without delay): accepted already.
        self._write('EVAL', ENQUEUE, 3, self.queue_key, self.priority_key,
                    self.keys.priority_seq, tag_message(
                        data, priority, infinite=self.deferring))

    @property
    def task_priority(self):
        """The priority of the task this thread's worker runs (set by the
        worker around Huey's execute), for add_to_schedule: Huey hands
        it a message without its priority."""
        return getattr(self._local, 'task_priority', None)

    @task_priority.setter
    def task_priority(self, value):
        self._local.task_priority = value

    # Naive datetimes are UTC, as Huey's are with utc=True (the suite's
    # own app); an adopted app running Huey with utc=False sets it False.
    utc = True

    def convert_ts(self, ts):
        """The schedule score of `ts`: unix seconds (float), whatever the
        host's time zone.  Huey's RedisStorage reads a naive datetime as
        local time (time.mktime): hosts in different zones, or one host
        across a daylight-saving change, scored the same eta differently,
        and a delayed task came due hours early (then bounced between
        worker and scheduler until its eta) or late.  An aware datetime
        counts as what it says, a naive one as UTC (as local time when
        `utc` is False)."""
        if ts.tzinfo is not None:
            return ts.timestamp()
        seconds = calendar.timegm(ts.timetuple()) if self.utc else \
            time.mktime(ts.timetuple())
        return seconds + ts.microsecond * 1e-6

    def add_to_schedule(self, data, ts):
        score = self.convert_ts(ts)
        # Only Huey itself schedules while the worker defers its writes
        # (a task delayed or retrying): then the message is the task's
        # own, and keeps its priority for when it is due.  A task body
        # scheduling something else does it with deferring off.
        priority = self.task_priority if self.deferring else None
        if priority:
            # The task's own message: accepted with this priority already.
            data = tag_message(data, priority, infinite=True)
        self._write('ZADD', self.schedule_key, score, data)

    def stage_put_back(self, inflight_key, raw):
        """Stage the move of `raw` from `inflight_key` back to the queue,
        where its priority says (a plain message: the head of the list);
        the message of a cancelled task is dropped instead (the script
        answers 0; the caller records the task canceled)."""
        self.stage_command('EVAL', PUT_BACK, 3, inflight_key,
                           self.queue_key, self.priority_key, raw,
                           self.keys.cancel_message_prefix)

    # -- the queue as a whole: plain and priority messages -----------------

    def queue_key_types(self):
        """{key: the Redis types it may have} for the keys producers write
        as the queue ('none': absent)."""
        return {self.queue_key: ('list', 'none')}

    def check_queue_key(self, origin=None):
        """Raise ConfigError when another kind of producer owns the queue's
        key: a PriorityRedisHuey keeps a sorted set where this storage
        keeps a list (Redis would answer WRONGTYPE to every read, which is
        no outage to wait out).  RedisError when Redis cannot answer."""
        from .config import ConfigError
        # Huey deletes an empty sorted set: an adopted PriorityRedisHuey's
        # queue leaves this mark (its consumers and CLI write it), so a
        # drained queue is not taken for a list's either.
        mark = self.conn.get(self.keys.layout)
        if mark == NATIVE_LAYOUT and not isinstance(self,
                                                    NativePriorityQueue):
            raise ConfigError(
                'the queue %r is a PriorityRedisHuey app\'s (%s names it, '
                'a sorted set at %r while tasks wait): run that app with '
                '[huey] app = MODULE:ATTRIBUTE, here too (docs/adoption.md)'
                % (self.name, self.keys.layout, self.queue_key),
                'huey', 'queue', self.name, origin=origin)
        for key, allowed in self.queue_key_types().items():
            kind = self.conn.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind in allowed:
                continue
            if kind == 'zset':
                why = ('a PriorityRedisHuey writes this queue: run that app '
                       'with [huey] app = MODULE:ATTRIBUTE (docs/adoption.md)')
            elif kind == 'list':
                why = ('the suite\'s own app or a RedisHuey wrote it (a '
                       'command run without [huey] app?); once its tasks '
                       'are run or moved, DEL %s' % key)
            else:
                why = 'something other than Huey wrote it'
            raise ConfigError(
                'the queue %r is kept in Redis key %r, which is a %s, not a '
                '%s: %s' % (self.name, key, kind, ' or '.join(
                    a for a in allowed if a != 'none'), why),
                'huey', 'queue', self.name, origin=origin)

    def queue_size_commands(self):
        """The reads queue_size() makes, for callers batching them with
        others; queue_size_of() adds their replies up."""
        return [('LLEN', self.queue_key), ('ZCARD', self.priority_key),
                ('LINDEX', self.queue_key, -1)]

    @staticmethod
    def queue_size_of(replies):
        llen, zcard, head = replies
        return int(llen) + int(zcard) - (1 if head == MARKER else 0)

    def queue_size(self):
        commands = self.queue_size_commands()
        return self.queue_size_of(self.flush_all(*commands)[-len(commands):])

    def enqueued_items(self, limit=None):
        """The messages in the order they will run (Huey's messages:
        priority messages without their prefix, no marker)."""
        conn = self.conn
        pipe = conn.pipeline(transaction=True)
        pipe.zrange(self.priority_key, 0, -1, withscores=True)
        pipe.lrange(self.queue_key, 0, -1)
        ranked, plain = pipe.execute()
        items = [m for m, score in ranked if score < 0]
        items += [m for m in reversed(plain) if m != MARKER]
        items += [m for m, score in ranked if score >= 0]
        items = [message_data(m) for m in items]
        return items[:limit] if limit else items

    def flush_queue(self):
        self.conn.delete(self.queue_key, self.priority_key)

    def scheduled_items(self, limit=None):
        return [message_data(m) for m in super().scheduled_items(limit)]

    def put_data(self, key, value, is_result=False):
        rkey = self.result_key(key)
        if is_result:
            self._write('SET', rkey, value, 'EX', self._expire_time)
            if self.notify_result:
                nkey = self.notify_prefix + (key.decode('utf8') if isinstance(
                    key, bytes) else key)
                self._write('LPUSH', nkey, b'1')
                self._write('EXPIRE', nkey, self.notify_result_ttl)
        elif key.startswith('r:') if isinstance(key, str) else \
                key.startswith(b'r:'):
            # Huey's revoke mark of one task id: it stays after a revoked
            # task is dropped (Huey deletes it only after a run), so it
            # ends with the task's result.  A task type's mark (rt:) is
            # the operator's until restored, as are huey.put()'s values.
            self._write('SET', rkey, value, 'EX', self._expire_time)
        else:
            self._write('SET', rkey, value)

    def delete_data(self, key):
        rkey = self.result_key(key)
        return self._write('DEL', rkey)

    def delete_counter(self, key):
        ckey = self.counter_key(key)
        self._write('DEL', ckey)

    def peek_data(self, key):
        from huey.constants import EmptyData
        rkey = self.result_key(key)
        value = self._read(lambda c: c.get(rkey))
        return EmptyData if value is None else value

    pop_data = peek_data

    def peek_many(self, keys):
        primed = getattr(self._local, 'primed', None)
        if primed is not None:
            self._local.primed = None
            if all(k in primed for k in keys):
                return {k: primed[k] for k in keys if primed[k] is not None}
        rkeys = [self.result_key(k) for k in keys]
        values = self._read(lambda c: c.mget(rkeys))
        return {k: v for k, v in zip(keys, values) if v is not None}

    def has_data_for_key(self, key):
        rkey = self.result_key(key)
        return self._read(lambda c: c.exists(rkey)) != 0

    def put_if_empty(self, key, value, ttl=None):
        rkey = self.result_key(key)
        return bool(self.flush(lambda c: c.set(rkey, value, nx=True, ex=ttl)))

    def incr(self, key, amount=1):
        # Needs its own reply mid-pipeline; send what is held back first.
        if self.has_pending():
            self.flush()
        return super().incr(key, amount)   # INCR and EXPIRE: it ends

    def read_schedule(self, ts):
        # Huey's own scheduler loop: it enqueues what is due again with
        # each task's priority, so the prefix goes.
        if self.has_pending():
            self.flush()
        return [message_data(m) for m in super().read_schedule(ts)]


class NativePriorityQueue:
    """Mixed into SuiteStorage for an adopted PriorityRedisHuey: its
    producers, plain huey ones included, keep Huey's own queue, a sorted
    set at huey.redis.NAME (member: an 8-byte time prefix and the message;
    score: -priority).  No Redis command moves a sorted set's member into a
    list atomically while blocking, so a worker does not block on that set:
    its read is BRIDGE_TAKE, one script that moves the best message of
    Huey's set or of the suite's own list (hw:NAME:queue) and priority set
    (messages put back, retries, periodic tasks) into its in-flight list;
    with nothing there it waits up to WAKE_POLL seconds on a wake-up list
    the suite's producers push to.
    A task enqueued through the suite thus starts at once, one enqueued by
    a plain producer within WAKE_POLL.  Everything behind the read (the
    in-flight lists, recovery, the schedule, dead letters) is the suite's
    usual list and set."""

    WAKE_POLL = 1   # seconds; an integer, as Redis 5's BLPOP takes it
    enqueue_is_lpush = False   # Huey's sorted set, and the wake-up

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_key = self.queue_key
        self.queue_key = self.keys.prefix + 'queue'
        self.wake_key = self.keys.prefix + 'wake'
        self._bridge = self.conn.register_script(BRIDGE_TAKE)

    def _take_keys(self, inflight_key):
        return (self.queue_key, self.priority_key, inflight_key,
                self.native_key)

    def enqueue(self, data, priority=None):
        # Huey's own form (RedisPriorityQueue.enqueue), plus the wake-up.
        score = -priority_text_value(priority, self.deferring) \
            if priority else 0
        member = struct.pack('>Q', int(time.time() * 1e6)) + data
        self._write('EVAL', NATIVE_ENQUEUE, 2, self.native_key,
                    self.wake_key, member, score)

    def _dequeue_command(self, inflight_key, timeout):
        return ('EVALSHA', self._bridge.sha, 4) + \
            self._take_keys(inflight_key) + (b'',)

    def _take_now(self, inflight_key, held, cached=True):
        keys = self._take_keys(inflight_key)
        conn = getattr(self._local, 'own', None)
        if conn is None:
            return self._bridge(keys=keys, args=[held])
        if cached:
            try:
                return transaction.command(conn, 'EVALSHA', self._bridge.sha,
                                           4, *keys, held)
            except redis.exceptions.NoScriptError:
                pass
        return transaction.command(conn, 'EVAL', BRIDGE_TAKE, 4, *keys, held)

    def dequeue_into(self, inflight_key, timeout):
        """As SuiteStorage.dequeue_into; an empty read waits for a wake-up
        (at most WAKE_POLL seconds) and reads once more."""
        local = self._local
        if getattr(local, 'prefetch', None) == inflight_key or \
                getattr(local, 'prefetched', None) is not None:
            message = super().dequeue_into(inflight_key, timeout)
        else:
            message = self._received(self._take_now(inflight_key, b''),
                                     inflight_key)
        if message is not None:
            return message
        conn = getattr(local, 'own', None)
        wait = max(1, min(self.WAKE_POLL, int(round(timeout))))
        if conn is None:
            self.conn.blpop([self.wake_key], timeout=wait)
        else:
            transaction.command(conn, 'BLPOP', self.wake_key, wait)
        return self._received(self._take_now(inflight_key, b''),
                              inflight_key)

    def dequeue(self):
        """Huey's own read (at most once): the best message."""
        scratch = self.keys.prefix + 'dequeue'
        pipe = self.conn.pipeline(transaction=True)
        self._bridge(keys=self._take_keys(scratch), args=[b''], client=pipe)
        pipe.delete(scratch)
        message = pipe.execute()[0][0]
        return None if message is None else message_data(message)

    def queue_key_types(self):
        return dict(super().queue_key_types(),
                    **{self.native_key: ('zset', 'none')})

    def check_queue_key(self, origin=None):
        super().check_queue_key(origin)
        self.conn.set(self.keys.layout, NATIVE_LAYOUT)

    def queue_size_commands(self):
        return super().queue_size_commands() + [('ZCARD', self.native_key)]

    @staticmethod
    def queue_size_of(replies):
        llen, zcard, head, native = replies
        return int(llen) + int(zcard) + int(native) - \
            (1 if head == MARKER else 0)

    def enqueued_items(self, limit=None):
        pipe = self.conn.pipeline(transaction=True)
        pipe.zrange(self.native_key, 0, -1, withscores=True)
        pipe.zrange(self.priority_key, 0, -1, withscores=True)
        pipe.lrange(self.queue_key, 0, -1)
        native, ranked, plain = pipe.execute()
        # The suite's own first within a priority: they are older.
        order = [(score, 0, i, message_data(m))
                 for i, (m, score) in enumerate(ranked)]
        order += [(0, 0, len(ranked) + i, m)
                  for i, m in enumerate(reversed(plain)) if m != MARKER]
        order += [(score, 1, i, m[8:]) for i, (m, score) in enumerate(native)]
        items = [m for *_, m in sorted(order, key=lambda o: o[:3])]
        return items[:limit] if limit else items

    def flush_queue(self):
        self.conn.delete(self.native_key, self.queue_key, self.priority_key,
                         self.wake_key)


class NativePriorityStorage(NativePriorityQueue, SuiteStorage):
    """SuiteStorage on an adopted PriorityRedisHuey's queue."""
