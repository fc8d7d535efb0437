"""Task module used by the tests, named in [tasks] modules as a user's own
module would be."""
import os
import time

from daemon.app import huey


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
