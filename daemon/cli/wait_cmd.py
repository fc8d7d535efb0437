"""`huey-worker wait ID`: follow a task to its end with a progress bar.

Exit codes: 0 complete; 1 failed, revoked, expired or canceled; 66 unknown
id; 69 Redis unreachable; 75 --timeout reached first."""
import json
import time

import click

from .. import overview
from ..exitcodes import EX_FAILURE, EX_NOINPUT, EX_OK, EX_TEMPFAIL
from .ops_common import connect, fail, ops_command, print_json

BAR_WIDTH = 30


def exit_code(state):
    return EX_OK if state == 'complete' else EX_FAILURE


@click.command('wait')
@click.argument('task_id')
@click.option('--timeout', type=click.FloatRange(0, None), default=None,
              metavar='SECONDS', help='Give up after this long (exit 75).')
@click.option('--interval', type=click.FloatRange(0.05, 60), default=0.5,
              show_default=True, metavar='SECONDS',
              help='Seconds between reads of the journal.')
@click.option('--quiet', '-q', is_flag=True, help='No progress output.')
@ops_command
def command(task_id, timeout, interval, quiet, as_json, **params):
    """Wait for task TASK_ID to finish, showing its progress (from the
    journal) on stderr; print the outcome.  Exit 0 complete, 1 failed/
    revoked/expired/canceled, 66 unknown id, 75 on --timeout."""
    app = connect(params)
    raise SystemExit(follow(app, task_id, timeout, interval, quiet, as_json))


def follow(app, task_id, timeout=None, interval=0.5, quiet=False,
           as_json=False):
    deadline = None if timeout is None else time.monotonic() + timeout
    show = ProgressLine(enabled=not quiet)
    while True:
        _, record = overview.find_task(app, task_id)
        if record is None:
            show.close()
            fail(EX_NOINPUT, 'unknown task id %r' % task_id)
        show.update(record)
        if record['terminal']:
            show.close()
            report(record, as_json)
            return exit_code(record['state'])
        if deadline is not None and time.monotonic() >= deadline:
            show.close()
            if as_json:
                print_json(record)
            click.echo('huey-worker: task %s still %s after %gs' % (
                task_id, record['state'], timeout), err=True)
            return EX_TEMPFAIL
        pause = interval if deadline is None else max(
            0, min(interval, deadline - time.monotonic()))
        time.sleep(pause)


def report(record, as_json):
    if as_json:
        print_json(record)
        return
    line = '%s %s' % (record['id'], record['state'])
    if record.get('duration') is not None:
        line += ' in %.3fs' % record['duration']
    click.echo(line)
    if record.get('error'):
        click.echo('error: %s: %s' % (record['error']['type'],
                                      record['error']['message']))
    if record.get('result') is not None:
        click.echo(json.dumps(record['result'], default=repr))


class ProgressLine:
    """A bar redrawn in place on a terminal; one line per change
    otherwise (logs, CI)."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.tty = click.get_text_stream('stderr').isatty()
        self.last = None

    def update(self, record):
        if not self.enabled:
            return
        text = describe(record)
        if text == self.last:
            return
        self.last = text
        if self.tty:
            click.echo('\r\x1b[2K' + text, nl=False, err=True)
        else:
            click.echo(text, err=True)

    def close(self):
        if self.enabled and self.tty and self.last is not None:
            click.echo('', err=True)


def describe(record):
    p = record.get('progress') or {}
    state = record['state']
    if p.get('percent') is not None:
        filled = int(BAR_WIDTH * min(100.0, p['percent']) / 100)
        bar = '[%s%s] %5.1f%%' % ('#' * filled, '-' * (BAR_WIDTH - filled),
                                  p['percent'])
    elif p.get('current') is not None:
        bar = '[%s] %s' % ('?' * 3, p['current'])
    else:
        bar = ''
    parts = [state, bar]
    if p.get('current') is not None and p.get('total') is not None:
        parts.append('%s/%s' % (p['current'], p['total']))
    if p.get('message'):
        parts.append(p['message'])
    return ' '.join(x for x in parts if x)
