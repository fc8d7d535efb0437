"""`huey-worker status`: health, queues, consumers and recent tasks."""
import click

from .. import journal, overview
from ..exitcodes import EX_FAILURE, EX_OK
from .ops_common import (ago, connect, ops_command, print_json,
                         progress_text, redis_unreachable, short, table)


@click.command('status')
@click.option('--recent', default=10, show_default=True, metavar='N',
              type=click.IntRange(0, 1000),
              help='How many recently changed tasks to list.')
@ops_command
def command(recent, as_json, **params):
    """Overall state: health (as GET /health), queue depths (GET /queue),
    consumers, and the most recently changed tasks.  Exit 0 when healthy,
    1 when not (the reasons are printed), 69 when Redis is unreachable."""
    app = connect(params)
    healthy, health = overview.health_report(app)
    if not health['checks']['redis']['ok']:
        # The endpoint answers this as a health report; a command has no
        # report to give, only the reason it has none.
        redis_unreachable(health['checks']['redis']['error'])
    report = {'health': health,
              'queue': overview.queue_report(app)['queues'],
              'workers': overview.workers_report(app)['totals'],
              'recent': journal.list_tasks(app, app.storage, recent)
              if recent else []}
    if as_json:
        print_json(report)
    else:
        click.echo(render(report))
    raise SystemExit(EX_OK if healthy else EX_FAILURE)


def render(report):
    health = report['health']
    out = ['health: %s' % health['status']]
    out += ['  - %s' % reason for reason in health['reasons']]
    checks = health['checks'].get('queues', {})
    rows = []
    for name, q in report['queue'].items():
        sched = checks.get(name, {}).get('scheduler', {})
        leader = ('-' if not sched.get('deployed') else
                  (sched.get('leader') or 'yes') if sched.get('leader_present')
                  else 'NONE')
        rows.append([name, q['pending'], q['scheduled'], q['running'],
                     q['results_held'], q['dead_letters'], q['consumers'],
                     '%d/%d' % (q['workers'] - q['idle_workers'],
                                q['workers']), leader])
    out += ['', table(['QUEUE', 'PENDING', 'SCHEDULED', 'RUNNING', 'RESULTS',
                       'DEAD', 'CONSUMERS', 'BUSY', 'SCHEDULER'], rows)]
    if report.get('recent'):
        rows = [[t['id'], short(t['name'], 40), t['state'],
                 progress_text(t), ago(t['updated'])]
                for t in report['recent']]
        out += ['', 'recent tasks:',
                table(['ID', 'NAME', 'STATE', 'PROGRESS', 'CHANGED'], rows)]
    return '\n'.join(out)
