"""Tasks of the operator-action tests (tests/test_actions_*.py): each
leaves a trace of every run in a file, so a test counts the runs."""
import os
import time

from huey_worker import huey


def _note(log, line):
    with open(log, 'a') as fh:
        fh.write(line + '\n')


@huey.task()
def fail_unless(flag, log, token):
    """Fails until `flag` exists; each run appends `token` to `log`."""
    _note(log, 'run %s' % token)
    if not os.path.exists(flag):
        raise RuntimeError('no flag yet')
    return token


@huey.task()
def hold_then_fail(gate, log):
    """Appends to `log`, waits for `gate`, then fails."""
    _note(log, 'start')
    while not os.path.exists(gate):
        time.sleep(0.02)
    raise RuntimeError('released to fail')


@huey.task()
def note(log, token):
    _note(log, token)
    return token


@huey.task()
def quick(n):
    time.sleep(0.002)
    return n


@huey.task()
def paced(n):
    """600 of these keep 3 workers busy some 4 s: long enough for a CLI
    started after the first finished to find most of them still queued,
    even on a loaded machine."""
    time.sleep(0.02)
    return n
