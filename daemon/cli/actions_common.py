"""What the action commands (retry, revoke, restore, purge-queue, find)
share: the actor a CLI user is, printing outcomes, and exit codes
(docs/exit-codes.md): 0 when every task named was acted on (or needed
nothing), 1 when one was refused (its state, a delivery under way...),
66 when one is unknown, 65 for a bad filter value."""
import sys

import click

from ..actions import ActionError, Actor, summary
from ..exitcodes import EX_FAILURE, EX_NOINPUT, EX_OK
from .common import exits_on
from .ops_common import fail, print_json, table

# ActionError: its message, its exit code.
action_errors = exits_on(ActionError,
                         lambda exc: fail(exc.exit_code, str(exc)))


def actor():
    return Actor.cli()


def report(outcomes, as_json, verb, extra=None):
    """Print what happened to each task and exit with the code it calls
    for."""
    result = summary(outcomes)
    if extra:
        result.update(extra)
    if as_json:
        print_json(result)
    else:
        rows = []
        for o in result['tasks']:
            if o['done']:
                what = 'already %s' % verb if o.get('already') else verb
            else:
                what = 'refused: %s' % o['detail']
            rows.append([o['task_id'], o['queue'], o['state'], what])
        if rows:
            click.echo(table(['TASK', 'QUEUE', 'WAS', 'RESULT'], rows))
        click.echo('%d %s, %d refused, %d unknown' % (
            result['done'], verb, result['refused'], result['unknown']))
    if result['unknown']:
        sys.exit(EX_NOINPUT)
    sys.exit(EX_FAILURE if result['refused'] else EX_OK)
