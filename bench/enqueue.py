"""Enqueue rate from one producer: `task()` calls in a loop, each one
round trip (for the suite: the journal record and the LPUSH in one script,
journal ENQUEUE_RECORDED, the way a web application enqueues)."""
import time


def rate(client, task, count):
    client.flushdb()   # our private server, started by this benchmark
    for _ in range(50):
        task()          # connection set up, code warm
    started = time.perf_counter()
    for _ in range(count):
        task()
    elapsed = time.perf_counter() - started
    queued = client.llen('huey.redis.huey')
    if queued != count + 50:
        raise RuntimeError('%d of %d enqueued tasks found in the queue' % (
            queued, count + 50))
    return count / elapsed
