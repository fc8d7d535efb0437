"""`huey-worker workers`: consumers and their workers."""
import click

from .. import overview
from .ops_common import ago, connect, ops_command, print_json, short, table


@click.command('workers')
@click.option('--all', 'show_all', is_flag=True,
              help='Also list consumers whose heartbeat stopped.')
@ops_command
def command(show_all, as_json, **params):
    """List the consumers (host, pid, started, last heartbeat) and each
    worker's current task (as GET /workers)."""
    app = connect(params)
    report = overview.workers_report(app)
    if not show_all:
        report['consumers'] = [c for c in report['consumers'] if c['alive']]
    if as_json:
        print_json(report)
        return
    click.echo(render(report))


def render(report):
    if not report['consumers']:
        return 'no live consumer'
    rows = []
    for c in report['consumers']:
        rows.append([c['identity'], c['queue'], c['host'], c['pid'],
                     c['worker_type'], ago(c['started']),
                     ago(c['last_heartbeat']),
                     'alive' if c['alive'] else 'SILENT',
                     '%d/%d' % (c['busy'], len(c['workers'])), c['restarts']])
    out = [table(['CONSUMER', 'QUEUE', 'HOST', 'PID', 'TYPE', 'STARTED',
                  'HEARTBEAT', 'STATE', 'BUSY', 'RESTARTS'], rows), '']
    rows = []
    for c in report['consumers']:
        for w in c['workers']:
            task = w.get('current_task') or {}
            rows.append([c['identity'], w['worker'], w['pid'],
                         'busy' if w['busy'] else 'idle',
                         short(task.get('name'), 40), task.get('id'),
                         ago(task.get('started')) if task else None,
                         w['done'], w['failed']])
    out.append(table(['CONSUMER', 'WORKER', 'PID', 'STATE', 'TASK', 'ID',
                      'SINCE', 'DONE', 'FAILED'], rows))
    t = report['totals']
    out.append('')
    out.append('%d live consumer(s), %d worker(s): %d busy, %d idle; %d '
               'restart(s)' % (t['consumers'], t['workers'], t['busy'],
                               t['idle'], t['restarts']))
    return '\n'.join(out)
