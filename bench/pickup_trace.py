"""Where a pickup's time goes inside a real, idle consumer: a launcher that
runs either consumer (this suite's or huey_consumer) with a few clock
marks on its delivery path, and the split of each probe of
bench/latency.py into its parts.

    python bench/pickup_trace.py MARKS_FILE -m huey_worker consumer ...
    python bench/pickup_trace.py MARKS_FILE path/to/huey_consumer ...

Marks (time.time(), as the probe's body stamps its start): `dequeued`
when a queue read hands a worker a message, not yet unpickled (the
suite's SuiteStorage.dequeue_into, huey's RedisStorage.dequeue); for the
suite also `txn_sent` and `txn_back` around its worker's first
transaction of the delivery (SuiteStorage.flush_all: the fence, the
delivery count, the revocation reads and the journal's running change).
They are kept in memory (a list append: well under a microsecond,
against the hundreds the parts take) and appended to MARKS_FILE.PID as
a worker goes back to its queue read.

The hot-loop profile (bench/profile_worker.py) runs the same code warm;
an idle consumer woken by one task pays for cold caches on each part, and
that is the figure a user's pickup sees.
"""
import atexit
import bisect
import os
import runpy
import sys
import threading
import time

MARKS = ('dequeued', 'txn_sent', 'txn_back')
# The parts of a probe, in order: name, from mark, to mark (None: the
# enqueue's send or the body's start, which bench/latency.py takes).
PARTS = (('enqueue sent -> queue read returns', None, 'dequeued'),
         ('queue read returns -> task body starts', 'dequeued', None),
         ('  of which: -> first transaction sent', 'dequeued', 'txn_sent'),
         ('  the first transaction (round trip)', 'txn_sent', 'txn_back'),
         ('  after it -> task body starts', 'txn_back', None))


class Recorder:
    def __init__(self, path):
        self.path = '%s.%d' % (path, os.getpid())
        self.marks = []
        self.lock = threading.Lock()
        atexit.register(self.write)

    def mark(self, name):
        self.marks.append((name, time.time()))

    def write(self):
        """Append the marks so far to the file: called as a worker is about
        to wait on the queue (between probes, outside every measured
        part; the benchmark ends a consumer with SIGKILL) and at exit."""
        if not self.marks:
            return
        with self.lock:
            marks, self.marks = self.marks, []
            with open(self.path, 'a') as out:
                out.writelines('%s %r\n' % m for m in marks)


def install(recorder):
    """Wrap the delivery path of both consumers (the module of whichever
    is not run is imported for nothing)."""
    import huey.storage
    from huey_worker import storage

    # huey's queue read, before the message is unpickled (as the suite's
    # mark is): RedisExpireHuey's storage inherits it.
    dequeue = huey.storage.RedisStorage.dequeue

    def traced_dequeue(self, *args, **kwargs):
        recorder.write()
        data = dequeue(self, *args, **kwargs)
        if data is not None:
            recorder.mark('dequeued')
        return data
    huey.storage.RedisStorage.dequeue = traced_dequeue

    dequeue_into = storage.SuiteStorage.dequeue_into
    flush_all = storage.SuiteStorage.flush_all
    # Set by a queue read that took a message: the thread's next
    # transaction is the delivery's first.
    first = threading.local()

    def traced_dequeue_into(self, *args, **kwargs):
        recorder.write()
        raw = dequeue_into(self, *args, **kwargs)
        if raw is not None:
            recorder.mark('dequeued')
            first.pending = True
        return raw

    def traced_flush_all(self, *args, **kwargs):
        if not getattr(first, 'pending', False):
            return flush_all(self, *args, **kwargs)
        first.pending = False
        recorder.mark('txn_sent')
        try:
            return flush_all(self, *args, **kwargs)
        finally:
            recorder.mark('txn_back')
    storage.SuiteStorage.dequeue_into = traced_dequeue_into
    storage.SuiteStorage.flush_all = traced_flush_all


def take_marks(path):
    """{mark name: sorted times} from every MARKS_FILE.PID of a run; the
    files are removed, so `path` serves the next run."""
    directory, prefix = os.path.split(path)
    out = {name: [] for name in MARKS}
    for name in os.listdir(directory or '.'):
        if not name.startswith(prefix + '.'):
            continue
        name = os.path.join(directory, name)
        with open(name) as fh:
            for line in fh:
                mark, when = line.split()
                out[mark].append(float(when))
        os.remove(name)
    for times in out.values():
        times.sort()
    return out


def split(probes, marks):
    """{part name: [microseconds, one per probe that has its marks]} for
    `probes`, (sent, body started) pairs in seconds: each probe's own
    marks are the first of each kind at or after its send."""
    parts = {name: [] for name, _, _ in PARTS}
    for sent, body in probes:
        at = {}
        for name in MARKS:
            times = marks[name]
            i = bisect.bisect_left(times, sent)
            at[name] = times[i] if i < len(times) and times[i] <= body \
                else None
        for name, start, end in PARTS:
            begin = sent if start is None else at[start]
            finish = body if end is None else at[end]
            if begin is not None and finish is not None:
                parts[name].append((finish - begin) * 1e6)
    return parts


def main(argv):
    if len(argv) < 2:
        sys.exit('usage: pickup_trace.py MARKS_FILE (-m MODULE | SCRIPT) '
                 '[ARGS...]')
    install(Recorder(argv[0]))
    if argv[1] == '-m':
        sys.argv = [argv[2]] + argv[3:]
        runpy.run_module(argv[2], run_name='__main__', alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name='__main__')


if __name__ == '__main__':
    main(sys.argv[1:])
