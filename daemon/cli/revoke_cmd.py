"""`huey-worker revoke`: revoke waiting tasks, by id or by task name
(daemon/actions/revoke.py)."""
import click

from .. import actions
from .actions_common import action_errors, actor, report
from .ops_common import connect, ops_command


@click.command('revoke')
@click.argument('task_ids', nargs=-1)
@click.option('--name', metavar='TASK', help='Revoke the task name as a '
              'whole: every task of it, those enqueued later too, until '
              '`restore --name`.')
@ops_command
@action_errors
def command(task_ids, name, as_json, **params):
    """Revoke tasks that wait (pending, scheduled or retrying): the worker
    that takes one skips it; the journal shows it revoked at once.  Undo
    with `restore` before a worker takes it.  Exit 0 when all were
    revoked, 1 when one was refused (running or ended), 66 when an id is
    unknown."""
    if bool(task_ids) == bool(name):
        raise click.UsageError('name TASK_IDS or --name TASK, not both')
    app = connect(params, with_tasks=True)
    if task_ids:
        report(actions.revoke(app, task_ids, actor()), as_json, 'revoked')
    full, outcomes = actions.revoke_name(app, name, actor())
    report(outcomes, as_json, 'revoked', {'name': full, 'name_revoked': True})
