"""Task module of the scheduler tests: a periodic task declared in code,
plain tasks an INI [periodic:NAME] section can name, and a task that
retries after a delay (so Huey puts it in the schedule)."""
from huey import crontab

from huey_worker import huey


@huey.periodic_task(crontab(minute='*'))
def every_minute():
    return 'tick'


@huey.task()
def report(kind, copies=1):
    return '%s x%d' % (kind, copies)


@huey.task(retries=1, retry_delay=1)
def fail_then_retry_later(path):
    """Fails on its first run; Huey schedules the retry one second later.
    Each run appends a line to `path`."""
    with open(path, 'a') as fh:
        fh.write('run\n')
    with open(path) as fh:
        runs = fh.read().count('run')
    if runs == 1:
        raise RuntimeError('first run fails')
    return runs
