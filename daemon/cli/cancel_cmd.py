"""`huey-worker cancel`: stop running tasks, revoke waiting ones
(daemon/actions/cancel.py)."""
import sys

import click

from .. import actions
from ..exitcodes import EX_FAILURE, EX_NOINPUT, EX_OK
from .actions_common import action_errors, actor
from .ops_common import connect, ops_command, print_json, table


@click.command('cancel')
@click.argument('task_ids', nargs=-1, required=True)
@ops_command
@action_errors
def command(task_ids, as_json, **params):
    """Cancel tasks.  A running task is stopped by its worker: a process
    worker is terminated (SIGTERM, SIGKILL 3 s later) and replaced; in a
    thread or greenlet worker the task gets TaskCanceled at its next
    report_progress() or check_cancelled() call (in a thread, raised in
    it 3 s later otherwise).  It ends canceled and is never delivered
    again, not even when its consumer dies meanwhile.  A task that waits
    has not started: it is revoked (restore undoes that).  Exit 0 when
    every task was cancelled (or was already), 1 when one has ended
    already, 66 when an id is unknown."""
    app = connect(params)
    outcomes = actions.cancel(app, task_ids, actor())
    result = actions.summary(outcomes)
    if as_json:
        print_json(result)
    else:
        rows = []
        for o in result['tasks']:
            if o['done']:
                what = actions.cancel_results.get(o['result'], o['result'])
                if o.get('already'):
                    what = 'already: ' + what
            else:
                what = 'refused: %s' % o['detail']
            rows.append([o['task_id'], o['queue'] or '-', o['state'] or '-',
                         what])
        click.echo(table(['TASK', 'QUEUE', 'WAS', 'RESULT'], rows))
        click.echo('%d cancelled, %d refused, %d unknown' % (
            result['done'], result['refused'], result['unknown']))
    if result['unknown']:
        sys.exit(EX_NOINPUT)
    sys.exit(EX_FAILURE if result['refused'] else EX_OK)
