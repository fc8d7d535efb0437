"""`huey-worker purge-queue`: empty a queue, or its schedule
(daemon/actions/purge.py)."""
import click

from .. import actions, overview
from ..exitcodes import EX_USAGE
from .actions_common import action_errors, actor
from .ops_common import connect, fail, ops_command, print_json


@click.command('purge-queue')
@click.option('--schedule', is_flag=True, help='Empty the schedule (delayed '
              'tasks, retries waiting their delay) instead of the queue.')
@click.option('--yes', is_flag=True, help='Confirm: without it nothing is '
              'removed, and the count that would be is printed.')
@ops_command
@action_errors
def command(schedule, yes, as_json, **params):
    """Remove every task waiting in the queue (plain and priority
    messages) or, with --schedule, in the schedule.  Their journal
    records end revoked (reason: purged) and their messages are kept, so
    `retry` can run one again.  Tasks already taken by a worker are left
    alone.  Prints the count.  Exit 64 without --yes."""
    app = connect(params)
    storage = overview.storage_for(app)
    what = 'schedule' if schedule else 'queue'
    if not yes:
        fail(EX_USAGE, '%d task(s) in the %s of queue %s; add --yes to '
                       'remove them' % (actions.purge_size(storage, schedule),
                                        what, storage.name))
    removed = (actions.purge_schedule if schedule else actions.purge_queue)(
        storage, actor())
    if as_json:
        print_json({'queue': storage.name, 'what': what, 'purged': removed})
    else:
        click.echo('%d purged from the %s of queue %s' % (removed, what,
                                                          storage.name))
