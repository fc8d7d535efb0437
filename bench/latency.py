"""Pickup latency: from the moment an enqueue leaves the producer to the
moment the task body starts, one task at a time into an idle queue.

The probe task pushes its start time (time.time()) to a list the
benchmark blocks on, so nothing polls.  The enqueue time is taken just
before the enqueue's round trip is sent: for the suite the journal record
and the LPUSH, staged and then flushed in one MULTI (a producer's own
enqueue sends them as one script: the same writes, taken apart here so
the clock starts after the producer's Python); for huey, its LPUSH.
Both sides run on this host, so one clock serves.
"""
import random
import time

from harness import held_writes, percentile, wait_redis_idle

STAMPS = 'bench:stamps'


def suite_sender(app, task):
    storage = app.storage

    def send():
        with held_writes(storage):
            task()
            sent = time.time()
            storage.flush()
        return sent
    return send


def plain_sender(app, task):
    storage = app.storage

    def send():
        data = app.serialize_task(task.s())
        sent = time.time()
        storage.enqueue(data)
        return sent
    return send


def sample(client, send, count, rng):
    """(sent, body started) of `count` probes, epoch seconds."""
    client.delete(STAMPS)
    out = []
    for _ in range(count):
        time.sleep(rng.uniform(0.002, 0.006))   # the queue is idle again
        sent = send()
        reply = client.blpop(STAMPS, timeout=30)
        if reply is None:
            raise RuntimeError('a probe task did not run within 30s')
        out.append((sent, float(reply[1])))
    return out


def probes(client, contender, send, count, seed):
    """Start `contender`, run `count` probes after a warm-up task, stop
    it; the probes as sample() gives them."""
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    contender.start()
    try:
        send()          # the first task: waits for start-up
        if client.blpop(STAMPS, timeout=60) is None:
            raise RuntimeError('%s ran no task within 60s; log: %s' % (
                contender.label, contender.log_path))
        time.sleep(0.3)
        return sample(client, send, count, random.Random(seed))
    finally:
        contender.stop()


def run_once(client, contender, send, count, seed):
    """{'p50': ms, 'p99': ms} of one run of `count` probes."""
    latencies = [(body - sent) * 1000.0 for sent, body in
                 probes(client, contender, send, count, seed)]
    return {'p50': percentile(latencies, 0.5),
            'p99': percentile(latencies, 0.99)}


def run_traced(client, contender, send, count, seed, marks_path):
    """One run with `contender` under bench/pickup_trace.py: {part name:
    median microseconds} (pickup_trace.PARTS; a part the consumer has no
    marks for is left out)."""
    import pickup_trace
    done = probes(client, contender.traced(marks_path), send, count, seed)
    parts = pickup_trace.split(done, pickup_trace.take_marks(marks_path))
    return {name: percentile(values, 0.5)
            for name, values in parts.items() if values}
