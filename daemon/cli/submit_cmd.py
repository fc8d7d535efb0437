"""`huey-worker submit NAME ARGS...`: enqueue a registered task by name."""
import json

import click

from .. import tasknames
from ..storage import priority_text
from ..exitcodes import EX_DATAERR, EX_NOINPUT, EX_USAGE
from . import wait_cmd
from .ops_common import (connect, fail, ops_command, print_json,
                         writing_output)


def parse_arg(text):
    """JSON when it parses (1, 2.5, true, null, [..], {..}, "quoted"),
    else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _priority(value):
    if value is None:
        return None
    try:
        priority_text(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--priority'")
    return int(value) if value.is_integer() else value


@click.command('submit')
@click.argument('name')
@click.argument('args', nargs=-1)
@click.option('--kwargs', 'kwargs_json', default=None, metavar='JSON',
              help='Keyword arguments as a JSON object.')
@click.option('--delay', type=click.FloatRange(0, 365 * 86400),
              default=None, metavar='SECONDS', help='Run no sooner than this.')
@click.option('--priority', type=float, default=None, metavar='NUMBER',
              callback=lambda ctx, param, value: _priority(value),
              help="Higher runs first (Huey's priority=); default: the "
                   "task's own, else 0.")
@click.option('--id', 'task_id', default=None, help='Use this task id.')
@click.option('--wait', 'wait', is_flag=True,
              help='Then wait for the outcome (exit code as `wait`).')
@click.option('--timeout', type=click.FloatRange(0, None), default=None,
              metavar='SECONDS', help='With --wait: give up after this long '
                                      '(exit 75).')
@ops_command
def command(name, args, kwargs_json, delay, priority, task_id, wait, timeout,
            as_json, **params):
    """Enqueue task NAME (full registered name, alias such as pdf.extract,
    or an unambiguous suffix) with ARGS (each JSON if it parses, else a
    string) and print its id.  Exit 66 for an unknown task, 64 for an
    ambiguous name, 65 for bad --kwargs, 74 when the id cannot be written
    (the task is enqueued all the same: the line says so, with the id).
    Refused in immediate mode (78): there is no queue to enqueue into.
    --priority: higher runs first; 64 when it is not a finite number."""
    kwargs = {}
    if kwargs_json is not None:
        try:
            kwargs = json.loads(kwargs_json)
        except ValueError as exc:
            fail(EX_DATAERR, '--kwargs is not valid JSON: %s' % exc)
        if not isinstance(kwargs, dict):
            fail(EX_DATAERR, '--kwargs must be a JSON object, e.g. '
                             '\'{"name": "value"}\'')
    app = connect(params, with_tasks=True)
    try:
        new_id, full = tasknames.submit(app, name, [parse_arg(a) for a in args],
                                        kwargs, delay=delay, task_id=task_id,
                                        priority=priority)
    except tasknames.UnknownTask as exc:
        fail(EX_NOINPUT, str(exc))
    except tasknames.AmbiguousTask as exc:
        fail(EX_USAGE, str(exc))
    try:
        if as_json and not wait:
            print_json({'task_id': new_id, 'task': full,
                        'state': 'scheduled' if delay else 'pending'})
        elif not as_json:
            click.echo(new_id)
        if wait:
            raise SystemExit(wait_cmd.follow(app, new_id, timeout,
                                             as_json=as_json))
    except OSError as exc:
        if writing_output(exc):
            # huey_worker.cli reports it (74): say the task is in the queue,
            # so that nobody submits it again for want of the id.
            exc.hw_note = 'the task %s WAS enqueued, id %s; do not submit ' \
                          'it again' % (full, new_id)
        raise
