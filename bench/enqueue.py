"""Enqueue rate from one producer: `task()` calls in a loop, each one
round trip (for the suite: the journal record and the LPUSH in one script,
journal ENQUEUE_RECORDED, the way a web application enqueues)."""
import contextlib
import os
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


@contextlib.contextmanager
def one_cpu(redis_pid):
    """This process and the Redis server `redis_pid` on one CPU (the last
    this process may use) for the block; their own CPU sets after."""
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(redis_pid)
    cpu = {max(mine)}
    os.sched_setaffinity(redis_pid, cpu)
    os.sched_setaffinity(0, cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        os.sched_setaffinity(redis_pid, theirs)
