"""The benchmark's tasks for the suite's consumer (named in [tasks] modules,
as a user's module would be).  bench/plain_tasks.py holds the same tasks
for the plain huey_consumer."""
import time

from huey_worker import huey


@huey.task()
def noop():
    # A result, so both consumers write one (Huey stores no None).
    return 1


STAMPS = 'bench:stamps'


@huey.task()
def stamp():
    """Tell the benchmark when the body started (pickup latency)."""
    huey.storage.conn.rpush(STAMPS, repr(time.time()))


@huey.task()
def hold(seconds):
    """Busy long enough to be killed while running."""
    time.sleep(seconds)
    return 1
