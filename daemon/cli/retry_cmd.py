"""`huey-worker retry`: run again tasks that ended failed, lost, revoked
or canceled (daemon/actions/retry.py)."""
import click

from .. import actions, overview
from ..journal.reads import WINDOW_FIELDS
from .actions_common import action_errors, actor, report
from .ops_common import connect, ops_command


@click.command('retry')
@click.argument('task_ids', nargs=-1)
@click.option('--name', metavar='TASK', help='Every retryable task of this '
              'task name (as `submit` takes it).')
@click.option('--state', type=click.Choice(actions.RETRYABLE),
              help='Only tasks that ended in this state (default: any of '
                   'them).')
@click.option('--since', metavar='TIME', help='Only tasks whose --field '
              'time is at or after TIME: epoch seconds, ISO 8601, or a '
              'duration ago (2h, 30m, 7d).')
@click.option('--until', metavar='TIME', help='... and at or before TIME.')
@click.option('--field', type=click.Choice(WINDOW_FIELDS),
              default='finished', show_default=True,
              help='The time --since and --until bound.')
@click.option('--limit', default=1000, show_default=True,
              type=click.IntRange(1, actions.SELECT_MAX),
              help='Most tasks one selection retries.')
@ops_command
@action_errors
def command(task_ids, name, state, since, until, field, limit, as_json,
            **params):
    """Run tasks again: each TASK_ID, or those a selection (--name,
    --state, --since/--until) finds.  A retry is a new delivery of the
    same task id with the same arguments (the message the journal kept);
    a task pending or running already is refused, so retrying twice runs
    it once.  Exit 0 when all were retried, 1 when one was refused, 66
    when an id is unknown."""
    selecting = name or state or since or until
    if bool(task_ids) == bool(selecting):
        raise click.UsageError('name TASK_IDS, or select tasks with --name, '
                               '--state, --since or --until (not both)')
    app = connect(params, with_tasks=True)
    who = actor()
    if task_ids:
        outcomes = actions.retry(app, task_ids, who)
    else:
        storage = overview.storage_for(app)
        try:
            since = None if since is None else actions.parse_time(since)
            until = None if until is None else actions.parse_time(until)
        except ValueError as exc:
            raise actions.ActionError(str(exc))
        if name:
            name = actions.resolve_name(app, storage, name)
        ids = actions.select_retryable(app, storage, name=name, state=state,
                                       since=since, until=until, field=field,
                                       limit=limit)
        outcomes = [actions.retry_one(app, storage, i, who) for i in ids]
    report(outcomes, as_json, 'retried')
