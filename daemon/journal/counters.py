"""The /metrics counters a worker process keeps before Redis has them.

Each outcome adds to a handful of hash counters (outcomes by task name,
the run-time and wait-time histograms and their sums, the results held
per hour).  Sent with every ack they were six or seven commands of the
ack's script, each costing Redis some 3 microseconds through redis.pcall:
a fifth of the Redis time of a no-op task.  Summed here instead, they go
out at most once per FLUSH_EVERY seconds per process, riding an ack (after
its guarded script, so a fenced ack does not take other tasks' counts
with it), and whatever is left when the worker goes idle or stops.  At a
rate under one task a second each outcome still sends its own counts at
once.  The cost: counters may lag by FLUSH_EVERY plus the queue read's
timeout, and a worker killed with SIGKILL loses at most its last second's
counts (the journal's records are written with each outcome as before)."""
import os
import threading
import time

FLUSH_EVERY = 1.0


class Counters:
    """{(hash key, field): amount} summed in this process, thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sums = {}
        self._expire = {}
        self._flushed = 0.0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        # A forked worker starts with nothing of its parent's to send.
        self._lock = threading.Lock()
        self._sums, self._expire = {}, {}
        self._flushed = 0.0

    def add(self, key, field, amount):
        """Add `amount` (int) to `field` of hash `key`."""
        with self._lock:
            entry = (key, field)
            self._sums[entry] = self._sums.get(entry, 0) + amount

    def add_many(self, counts):
        """add() for each (key, field, amount) of `counts`, under one
        lock."""
        with self._lock:
            sums = self._sums
            for key, field, amount in counts:
                entry = (key, field)
                sums[entry] = sums.get(entry, 0) + amount

    def expire(self, key, seconds):
        """Give hash `key` `seconds` to live when the counts are sent."""
        with self._lock:
            self._expire[key] = seconds

    def take_due(self, now=None):
        """The commands that send what is summed (HINCRBY, then EXPIRE),
        emptying the sums, when FLUSH_EVERY seconds have passed since the
        last send; else []."""
        now = time.monotonic() if now is None else now
        if now - self._flushed < FLUSH_EVERY:
            return []
        return self.take(now)

    def take(self, now=None):
        """The commands that send what is summed, emptying the sums: []
        when nothing is."""
        with self._lock:
            sums, self._sums = self._sums, {}
            expire, self._expire = self._expire, {}
            self._flushed = time.monotonic() if now is None else now
        commands = [('HINCRBY', key, field, amount)
                    for (key, field), amount in sums.items() if amount]
        commands += [('EXPIRE', key, seconds)
                     for key, seconds in expire.items()]
        return commands

    def put_back(self, commands):
        """Sum again what take() gave that Redis did not take."""
        for command in commands:
            if command[0] == 'HINCRBY':
                self.add(*command[1:])
            elif command[0] == 'EXPIRE':
                self.expire(*command[1:])

    def __bool__(self):
        return bool(self._sums)


# One per process: every app's keys carry their own prefix.
SHARED = Counters()
