"""Tasks for the crash-safety tests."""
import os
import signal
import time

import redis

from huey_worker.journal import current_delivery
from huey_worker import huey


@huey.task()
def slow_counted(seconds, tag):
    """Count each run in Redis (outside Huey's keys), sleep, return the
    delivery count this run saw."""
    huey.storage.conn.hincrby('test:runs', tag, 1)
    time.sleep(seconds)
    return current_delivery()


@huey.task()
def kill_my_worker():
    """A poison task: kills the process running it, every time."""
    huey.storage.conn.incr('test:poison-runs')
    os.kill(os.getpid(), signal.SIGKILL)


@huey.task()
def chaos_unit(i):
    # Count the run even across the Redis restart the chaos test makes: a
    # bookkeeping failure must not turn into a task failure.
    while True:
        try:
            huey.storage.conn.hincrby('test:chaos-runs', str(i), 1)
            break
        except (redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError):
            time.sleep(0.1)
    time.sleep(0.1 + (i % 5) * 0.02)
    return i
