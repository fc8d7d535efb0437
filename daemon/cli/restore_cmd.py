"""`huey-worker restore`: undo a revoke (daemon/actions/revoke.py)."""
import click

from .. import actions
from .actions_common import action_errors, actor, report
from .ops_common import connect, ops_command


@click.command('restore')
@click.argument('task_ids', nargs=-1)
@click.option('--name', metavar='TASK', help='Restore a task name revoked '
              'with `revoke --name`.')
@ops_command
@action_errors
def command(task_ids, name, as_json, **params):
    """Undo the revoke of tasks no worker has skipped yet: each goes back
    to the state it had (pending, scheduled, retrying).  A task a worker
    skipped has ended revoked: `retry` it instead.  Exit 0 when all were
    restored (or were not revoked), 1 when one was refused, 66 when an id
    is unknown."""
    if bool(task_ids) == bool(name):
        raise click.UsageError('name TASK_IDS or --name TASK, not both')
    app = connect(params, with_tasks=True)
    if task_ids:
        report(actions.restore(app, task_ids, actor()), as_json, 'restored')
    full, was, outcomes = actions.restore_name(app, name, actor())
    report(outcomes, as_json, 'restored', {'name': full,
                                           'name_was_revoked': was})
