"""Task module used by the tests, named in [tasks] modules as a user's own
module would be."""
import os
import time

from huey_worker import huey


@huey.task()
def add(a, b):
    return a + b


@huey.task()
def sleep_then_return(seconds, value=None):
    time.sleep(seconds)
    return value


@huey.task()
def touch_after(seconds, path):
    """Sleep, then create `path`: a side effect the test can observe."""
    time.sleep(seconds)
    with open(path, 'a') as fh:
        fh.write('%d\n' % os.getpid())
    return path


@huey.task(retries=1, retry_delay=0)
def fail_once(path):
    if not os.path.exists(path):
        open(path, 'w').close()
        raise RuntimeError('first attempt fails')
    return 'second attempt'


@huey.task()
def boom():
    raise ValueError('boom')


# --- journal, status endpoint and operator CLI tests -------------------------

from huey_worker.journal import (current_delivery, current_task_id,  # noqa: E402
                            report_progress, sensitive)


@huey.task()
def progress_steps(steps, gate=None, pause=0.0):
    """Report progress for each step; with `gate`, stop after the first
    half until that file exists (so a test can watch it mid-run)."""
    for step in range(1, steps + 1):
        report_progress(step, steps, 'step %d of %d' % (step, steps),
                        last_step=step, unit='items')
        if gate and step == steps // 2:
            while not os.path.exists(gate):
                time.sleep(0.02)
        if pause:
            time.sleep(pause)
    return {'steps': steps}


@huey.task()
def hold_until(gate, marker=None):
    """Write our pid to `marker`, then run until `gate` exists."""
    if marker:
        with open(marker, 'w') as fh:
            fh.write('%d %s %s' % (os.getpid(), current_task_id(),
                                   current_delivery()))
    while not os.path.exists(gate):
        time.sleep(0.02)
    return 'released'


@huey.task(retries=2, retry_delay=3600)
def fail_retry_later():
    raise RuntimeError('try again in an hour')


@huey.task(timeout=1)
def overrun(seconds):
    time.sleep(seconds)
    return 'finished'


@sensitive
@huey.task()
def login(user, password):
    return 'ok'


@huey.task(sensitive_args=('token',))
def call_api(url, token=None):
    return url


@huey.task()
def big_result(size):
    return 'x' * size
