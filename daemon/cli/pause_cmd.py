"""`huey-worker pause`: pause a queue (daemon/actions/pause.py)."""
import click

from .. import actions
from .actions_common import action_errors, actor
from .ops_common import connect, ops_command, print_json


def say(result):
    """The line a pause or resume prints."""
    info = result.get('pause') or result.get('was') or {}
    who = 'by %s (%s) from %s' % (info.get('by', '?'), info.get('via', '?'),
                                  info.get('from', '?'))
    if result['paused']:
        text = 'queue %s %s %s' % (result['queue'], 'was already paused' if
                                   result['already'] else 'paused', who)
        if info.get('reason'):
            text += ': %s' % info['reason']
        return text
    if result['already']:
        return 'queue %s was not paused' % result['queue']
    return 'queue %s resumed (it was paused %s)' % (result['queue'], who)


@click.command('pause')
@click.option('--reason', metavar='TEXT', help='Why (shown by status and '
              'in the queue events).')
@ops_command
@action_errors
def command(reason, as_json, **params):
    """Pause the queue on every host: workers finish the tasks they run
    and take nothing new until `huey-worker resume`; consumers started
    meanwhile start paused.  Producers and the scheduler go on filling
    the queue.  Each consumer applies it within half a second.  Exit 0
    (also when it was paused already).  The queue is [huey] queue
    (--queue NAME names another)."""
    app = connect(params)
    result = actions.pause(app, actor(), None, reason)
    print_json(result) if as_json else click.echo(say(result))
