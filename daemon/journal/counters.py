"""The /metrics counters a process keeps before Redis has them.

Each outcome adds to a handful of hash counters (outcomes by task name,
the run-time and wait-time histograms and their sums, the results held
per hour).  Sent with every ack they were seven commands of the ack's
script, each costing Redis some 3 microseconds through redis.pcall: a
fifth of the Redis time of a no-op task.  Summed here instead, a thread
of the process sends them every FLUSH_EVERY seconds in one transaction of
its own, whatever the workers do (a long task, a paused queue, an ack
Redis refuses), and a worker sends what is left when it stops (flush()).
The cost: counters lag the journal by up to FLUSH_EVERY (plus a Redis
outage: what Redis did not take is summed again and sent later), and a
process killed with SIGKILL takes at most its last FLUSH_EVERY of counts
with it (the journal's records are written with each outcome)."""
import atexit
import logging
import os
import threading
import time

import redis

log = logging.getLogger('huey_worker.journal')

FLUSH_EVERY = 1.0


class Counters:
    """Sums per Redis client: {client: {(hash key, field): amount}}, and
    the times to live their hashes get when sent; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sums = {}
        self._expire = {}
        self._sender = None
        self._exit_hook = False
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # A forked worker starts with nothing of its parent's to send, and
        # without its sender thread (threads do not survive a fork).
        self._lock = threading.Lock()
        self._sums, self._expire = {}, {}
        self._sender = None

    def add_many(self, client, counts, expire=None):
        """Add each (hash key, field, amount) of `counts` for Redis client
        `client` (a redis-py client; amounts are integers); `expire`:
        (hash key, seconds) it gets when sent.  Starts this process's
        sender on first use."""
        with self._lock:
            sums = self._sums.setdefault(client, {})
            for key, field, amount in counts:
                entry = (key, field)
                sums[entry] = sums.get(entry, 0) + amount
            if expire is not None:
                self._expire.setdefault(client, {})[expire[0]] = expire[1]
            start = self._sender is None
            if start:
                self._sender = threading.Thread(
                    target=self._send_every, name='huey-worker-counters',
                    daemon=True)
        if start:
            # Outside the lock: under gevent starting a thread switches
            # greenlets, and one that then waited on this (real) lock
            # would block the whole process.
            self._start_sender()

    def _start_sender(self):
        self._sender.start()
        if not self._exit_hook:
            # A process that ends normally sends what is left (a process
            # worker's exit path calls flush() itself).
            atexit.register(self.flush)
            self._exit_hook = True

    def _send_every(self):
        me = threading.current_thread()
        while self._sender is me:
            time.sleep(FLUSH_EVERY)
            if self._sender is me:
                self.flush()

    def take(self):
        """{client: [commands]} that send what is summed (HINCRBY, then
        EXPIRE), emptying the sums."""
        with self._lock:
            sums, self._sums = self._sums, {}
            expire, self._expire = self._expire, {}
        out = {}
        for client, entries in sums.items():
            out[client] = [('HINCRBY', key, field, amount)
                           for (key, field), amount in entries.items()
                           if amount]
        for client, keys in expire.items():
            out.setdefault(client, []).extend(
                ('EXPIRE', key, seconds) for key, seconds in keys.items())
        return out

    def put_back(self, client, commands):
        """Sum again what take() gave that Redis did not take."""
        self.add_many(client, [c[1:] for c in commands if c[0] == 'HINCRBY'])
        for command in commands:
            if command[0] == 'EXPIRE':
                self.add_many(client, (), expire=command[1:])

    def flush(self):
        """Send what is summed now, one MULTI/EXEC per client (all or
        nothing: a send that fails is summed again and goes with the
        next).  Returns how many commands went out."""
        sent = 0
        for client, commands in self.take().items():
            if not commands:
                continue
            try:
                pipe = client.pipeline(transaction=True)
                for command in commands:
                    pipe.execute_command(*command)
                pipe.execute()
                sent += len(commands)
            except redis.exceptions.RedisError as exc:
                self.put_back(client, commands)
                log.debug('/metrics counts kept for later: %s', exc)
        return sent

    def __bool__(self):
        return bool(self._sums)


# One per process: every app's keys carry their own prefix.
SHARED = Counters()
