"""`huey-worker dead-letters`: list, requeue and purge messages set aside."""
import json
import time

import click

from .. import app as app_module
from .. import deadletters
from ..exitcodes import EX_NOINPUT
from .common import config_options, exits_78_on_config_error, load_from
from .ops_common import exits_69_when_redis_unreachable


def _storage(params):
    cfg = load_from(params)
    return app_module.configure(cfg).storage


def _selectors(ids, select_all):
    if select_all and ids:
        raise click.UsageError('give IDs or --all, not both')
    if not select_all and not ids:
        raise click.UsageError('name dead-letter IDs or task IDs, or --all')
    return None if select_all else set(ids)


@click.group('dead-letters')
def command():
    """Messages set aside instead of run: bad signature, unknown task,
    undecodable, or poison (killed its worker max_deliveries times)."""


@command.command('list')
@config_options('redis', 'huey')
@click.option('--limit', default=100, show_default=True)
@click.option('--json', 'as_json', is_flag=True)
@exits_78_on_config_error
@exits_69_when_redis_unreachable
def list_(limit, as_json, **params):
    """Show dead letters, newest first."""
    records = deadletters.list_records(_storage(params), limit)
    if as_json:
        click.echo(json.dumps(records, indent=2, sort_keys=True))
        return
    if not records:
        click.echo('no dead letters')
        return
    click.echo('%-12s  %-19s  %-13s  %-36s  %s' % (
        'ID', 'WHEN', 'REASON', 'TASK ID', 'TASK / DETAIL'))
    for r in records:
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.get('at', 0)))
        click.echo('%-12s  %-19s  %-13s  %-36s  %s' % (
            r.get('id') or '-', when, r.get('reason'), r.get('task_id') or '-',
            r.get('task_name') or r.get('detail')))


@command.command('requeue')
@config_options('redis', 'huey')
@click.argument('ids', nargs=-1)
@click.option('--all', 'select_all', is_flag=True, help='Every dead letter.')
@exits_78_on_config_error
@exits_69_when_redis_unreachable
def requeue(ids, select_all, **params):
    """Put dead letters back in the queue (after fixing the cause: deploy
    the missing task, fix the key, or fix the task that killed workers)."""
    selectors = _selectors(ids, select_all)
    records = deadletters.requeue(_storage(params), selectors)
    click.echo('%d requeued' % len(records))
    if not records and ids:
        raise SystemExit(EX_NOINPUT)


@command.command('purge')
@config_options('redis', 'huey')
@click.argument('ids', nargs=-1)
@click.option('--all', 'select_all', is_flag=True, help='Every dead letter.')
@exits_78_on_config_error
@exits_69_when_redis_unreachable
def purge(ids, select_all, **params):
    """Delete dead letters for good."""
    selectors = _selectors(ids, select_all)
    removed = deadletters.purge(_storage(params), selectors)
    click.echo('%d purged' % removed)
    if not removed and ids:
        raise SystemExit(EX_NOINPUT)
