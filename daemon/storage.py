"""Huey's Redis storage, extended for crash-safe delivery and piggybacking.

Two additions to RedisExpireStorage:

* `dequeue_into(inflight_key)`: the message moves atomically from the queue
  into the worker's in-flight list (BRPOPLPUSH, Redis 5 compatible), so a
  worker that dies leaves it where it can be found.
* Piggybacked writes: a caller may stage commands (`stage_command()`;
  `stage()` for a Lua script), such as journal updates and the ack, to
  ride on the thread's next round trip, and while `deferring` is on
  every write Huey makes after a task body (result, retry, on_complete) is
  held back and sent with the ack in one MULTI/EXEC.  A read sends what is
  held back first, so Huey never reads stale data.
"""
import threading

from huey.storage import RedisExpireStorage

from . import transaction
from .keys import Keys


class SuiteStorage(RedisExpireStorage):
    def __init__(self, name='huey', expire_time=604800, **kwargs):
        super().__init__(name, expire_time=expire_time, **kwargs)
        self.keys = Keys(self.name)
        self._local = threading.local()

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

    def has_pending(self):
        return bool(getattr(self._local, 'pending', None))

    def flush(self, last=None):
        """Send staged commands (and `last`) in one MULTI/EXEC round trip.

        Returns the reply of `last`.  On a Redis error the staged commands
        are kept, so the caller may retry the whole flush after reconnecting.
        """
        pending = self._pending()
        if not pending:
            return last(self.conn) if last is not None else None
        return self.flush_all(last)[-1]

    def flush_all(self, *extra):
        """Like flush, but returns the replies of every command sent (those
        of the staged commands raw: nobody reads them, so redis-py's
        response callbacks are spared; those of `extra`, argument tuples
        or callables as for stage, as redis-py gives them)."""
        pending = self._pending()
        pipe = self._record(pending)
        staged = len(pipe.command_stack)
        self._record([c for c in extra if c is not None], pipe)
        results = transaction.execute(pipe, self._own_connection(),
                                      wanted=len(pipe.command_stack) - staged)
        pending.clear()
        return results

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

    def discard_pending(self):
        self._pending().clear()

    def _write(self, *args):
        """One write Huey makes (a command as its arguments): held back
        while deferring, else sent at once with whatever is staged."""
        if self.deferring:
            self._pending().append(args)
            return None
        return self.flush(lambda c: c.execute_command(*args))

    _read = flush

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
            local.prefetched = (transaction.read(conn),)
        return conn

    def flush_and_prefetch(self, inflight_key, timeout):
        """Send what is staged in one MULTI/EXEC and, in the same write, the
        next queue read: a worker's ack and its next dequeue share one
        round trip.  The read's reply is for the next dequeue_into().
        Without a connection of its own the thread just flushes.  On any
        error the read may or may not have moved a message into
        `inflight_key`; the staged commands are kept for a retry."""
        conn = self._own_connection()
        if conn is None:
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
        `inflight_key` as well as being returned."""
        local = self._local
        if getattr(local, 'prefetch', None) == inflight_key:
            local.prefetch = None
            return transaction.read(local.own)
        prefetched = getattr(local, 'prefetched', None)
        if prefetched is not None:
            local.prefetched = None
            return prefetched[0]
        conn = self._own_connection()
        if conn is None:
            return self.conn.brpoplpush(self.queue_key, inflight_key,
                                        timeout=max(1, int(round(timeout))))
        return transaction.command(conn, *self._dequeue_command(
            inflight_key, timeout))

    def _dequeue_command(self, inflight_key, timeout):
        return ('BRPOPLPUSH', self.queue_key, inflight_key,
                max(1, int(round(timeout))))

    # -- Huey's storage API, routed through the piggyback ------------------

    def enqueue(self, data, priority=None):
        if priority:
            raise NotImplementedError('task priorities are not supported by '
                                      'huey-worker (one FIFO queue per name)')
        self._write('LPUSH', self.queue_key, data)

    def add_to_schedule(self, data, ts):
        score = self.convert_ts(ts)
        self._write('ZADD', self.schedule_key, score, data)

    def put_data(self, key, value, is_result=False):
        rkey = self.result_key(key)
        if is_result:
            self._write('SET', rkey, value, 'EX', self._expire_time)
            if self.notify_result:
                nkey = self.notify_prefix + (key.decode('utf8') if isinstance(
                    key, bytes) else key)
                self._write('LPUSH', nkey, b'1')
                self._write('EXPIRE', nkey, self.notify_result_ttl)
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
        return bool(self._read(lambda c: c.set(rkey, value, nx=True, ex=ttl)))

    def incr(self, key, amount=1):
        # Needs its own reply mid-pipeline; send what is held back first.
        if self.has_pending():
            self.flush()
        return super().incr(key, amount)

    def read_schedule(self, ts):
        if self.has_pending():
            self.flush()
        return super().read_schedule(ts)
