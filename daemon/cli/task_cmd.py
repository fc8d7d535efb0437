"""`huey-worker task ID`: one task's journal record."""
import json

import click

from .. import overview
from ..exitcodes import EX_NOINPUT
from .ops_common import (ago, connect, fail, ops_command, print_json,
                         progress_text, when)


@click.command('task')
@click.argument('task_id')
@ops_command
def command(task_id, as_json, **params):
    """Show task TASK_ID: state, progress, worker, error, result and history
    (as GET /tasks/ID).  Exit 66 when the id is unknown."""
    app = connect(params)
    _, record = overview.find_task(app, task_id)
    if record is None:
        fail(EX_NOINPUT, 'unknown task id %r (never enqueued, or its record '
                         'expired)' % task_id)
    if as_json:
        print_json(record)
        return
    click.echo(render(record))


def enqueued_text(record):
    """When it was enqueued; for a task a plain Huey producer enqueued
    (its message carries no time), when the journal first saw it."""
    if record.get('enqueued') is not None or not record.get('first_seen'):
        return when(record.get('enqueued'))
    where = {'queue': 'in the queue', 'worker': 'by a worker'}.get(
        record.get('first_seen_in'), record.get('first_seen_in'))
    return 'unknown (first seen %s at %s)' % (where,
                                              when(record['first_seen']))


def render(record):
    r = record
    lines = [('task', r['id']), ('name', r.get('name')),
             ('state', r['state'])]
    if r.get('args_sensitive') and r.get('args') is None:
        lines.append(('args', '(sensitive, not recorded)'))
    elif r.get('args') is not None:
        lines.append(('args', json.dumps(r['args'], default=repr)))
    lines += [('enqueued', enqueued_text(r)),
              ('started', when(r.get('started'))),
              ('finished', when(r.get('finished')))]
    if r.get('duration') is not None:
        lines.append(('duration', '%.3fs' % r['duration']))
    if r.get('eta') and r['state'] == 'scheduled':
        lines.append(('eta', '%s (%s)' % (when(r['eta']), ago(r['eta']))))
    lines.append(('attempt', '%s (retries left: %s)' % (
        r.get('attempt', 0), '-' if r.get('retries_left') is None
        else r['retries_left'])))
    if r.get('next_retry') and r['state'] == 'retrying':
        lines.append(('next retry', '%s (%s)' % (when(r['next_retry']),
                                                 ago(r['next_retry']))))
    if r.get('requeues'):
        lines.append(('requeued', '%d time(s), last: %s' % (
            r['requeues'], r.get('requeued_reason'))))
    w = r.get('worker')
    if w:
        lines.append(('worker', '%s pid %s worker %s (consumer %s)' % (
            w.get('host'), w.get('pid'), w.get('worker'), w.get('consumer'))))
    if r.get('progress'):
        lines.append(('progress', progress_text(r)))
        if r['progress'].get('message'):
            lines.append(('message', r['progress']['message']))
    if r.get('metadata'):
        lines.append(('metadata', json.dumps(r['metadata'], sort_keys=True,
                                             default=repr)))
    if r.get('error'):
        lines.append(('error', '%s: %s' % (r['error']['type'],
                                           r['error']['message'])))
    if r.get('result') is not None:
        lines.append(('result', json.dumps(r['result'], default=repr)))
    elif r.get('result_omitted'):
        lines.append(('result', '(%s)' % r['result_omitted']))
    width = max(len(k) for k, _ in lines)
    out = ['%-*s  %s' % (width, k, '-' if v is None else v)
           for k, v in lines]
    if r.get('history'):
        out.append('history:')
        for event in r['history']:
            extra = ', '.join('%s=%s' % (k, v) for k, v in sorted(
                event.items()) if k not in ('at', 'state'))
            out.append('  %s  %-11s %s' % (when(event.get('at')),
                                           event.get('state'), extra))
    return '\n'.join(out)
