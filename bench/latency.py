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
    """Latencies in milliseconds of `count` probes."""
    client.delete(STAMPS)
    out = []
    for _ in range(count):
        time.sleep(rng.uniform(0.002, 0.006))   # the queue is idle again
        sent = send()
        reply = client.blpop(STAMPS, timeout=30)
        if reply is None:
            raise RuntimeError('a probe task did not run within 30s')
        out.append((float(reply[1]) - sent) * 1000.0)
    return out


def run_once(client, contender, send, count, seed):
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    contender.start()
    try:
        send()          # the first task: waits for start-up
        if client.blpop(STAMPS, timeout=60) is None:
            raise RuntimeError('%s ran no task within 60s; log: %s' % (
                contender.label, contender.log_path))
        time.sleep(0.3)
        samples = sample(client, send, count, random.Random(seed))
    finally:
        contender.stop()
    return {'p50': percentile(samples, 0.5), 'p99': percentile(samples, 0.99)}
