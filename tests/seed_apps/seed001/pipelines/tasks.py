"""Seed 001 in small: the PDF pipeline's own Huey instance and tasks."""
import os
import time

from huey import RedisHuey

huey = RedisHuey(os.environ['HUEY_QUEUE_NAME'],
                 url=os.environ['HUEY_REDIS_URL'])


@huey.task(retries=3, retry_delay=1)
def pdf_extract_process_task(marker):
    """Fails on its first attempt (no marker file yet), then succeeds."""
    if not os.path.exists(marker):
        with open(marker, 'w') as fh:
            fh.write('first attempt\n')
        raise RuntimeError('temporary failure, retried')
    return {'pages': 3, 'pid': os.getpid()}


@huey.task()
def slow_extract(log_path, seconds):
    """Appends a line per run, then works for a while (killed mid-task in
    the tests)."""
    with open(log_path, 'a') as fh:
        fh.write('run %d\n' % os.getpid())
    time.sleep(seconds)
    return 'extracted'
