"""`huey-worker resume`: resume a paused queue
(daemon/actions/pause.py)."""
import click

from .. import actions
from .actions_common import action_errors, actor
from .ops_common import connect, ops_command, print_json
from .pause_cmd import say


@click.command('resume')
@ops_command
@action_errors
def command(as_json, **params):
    """Resume a paused queue: workers take tasks again within half a
    second.  Exit 0 (also when it was not paused).  The queue is [huey]
    queue (--queue NAME names another)."""
    app = connect(params)
    result = actions.resume(app, actor(), None)
    print_json(result) if as_json else click.echo(say(result))
