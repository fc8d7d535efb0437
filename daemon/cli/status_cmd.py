"""`huey-worker status`: health, queues, consumers and recent tasks;
with --watch, again every few seconds until Ctrl-C."""
import datetime
import json
import sys
import time

import click

from .. import actions, journal, overview
from ..exitcodes import EX_FAILURE, EX_OK
from .ops_common import (ago, connect, ops_command, print_json,
                         progress_text, redis_unreachable, short, table)


# Clear the screen and go home: one refresh replaces the last in place.
CLEAR = '\x1b[H\x1b[2J'


@click.command('status')
@click.option('--recent', default=10, show_default=True, metavar='N',
              type=click.IntRange(0, 1000),
              help='How many recently changed tasks to list.')
@click.option('--watch', type=click.FloatRange(0.1, 3600), is_flag=False,
              flag_value=2.0, default=None, metavar='[SECONDS]',
              help='Refresh every SECONDS (2 when not given) until Ctrl-C: '
                   'in place on a terminal, one line per refresh into a '
                   'pipe (--json: one JSON object per line).')
@ops_command
def command(recent, watch, as_json, **params):
    """Overall state: health (as GET /health), queue depths (GET /queue),
    consumers, and the most recently changed tasks.  Exit 0 when healthy,
    1 when not (the reasons are printed), 69 when Redis is unreachable.
    With --watch it runs until interrupted (Ctrl-C: killed by SIGINT,
    exit 130 in a shell) and rides out Redis outages, showing them."""
    app = connect(params)
    if watch is not None:
        run_watch(app, recent, watch, as_json)
    report = gather(app, recent)
    if report is None:
        # The endpoint answers this as a health report; a command has no
        # report to give, only the reason it has none.
        redis_unreachable(_health_error)
    if as_json:
        print_json(report)
    else:
        click.echo(render(report))
    raise SystemExit(EX_OK if report['health']['ready'] else EX_FAILURE)


_health_error = None


def gather(app, recent):
    """The report, or None when Redis is unreachable (the reason in
    _health_error)."""
    global _health_error
    healthy, health = overview.health_report(app)
    if not health['checks']['redis']['ok']:
        _health_error = health['checks']['redis']['error']
        return None
    return {'health': health,
            'queue': overview.queue_report(app)['queues'],
            'workers': overview.workers_report(app)['totals'],
            'recent': journal.list_tasks(app, app.storage, recent)
            if recent else [],
            # Pause and resume (who, when, from where), newest first.
            'events': {name: actions.queue_events(storage, 5)
                       for name, storage in overview.queue_storages(app)}}


def run_watch(app, recent, interval, as_json, out=None):
    """Report every `interval` seconds until interrupted.  On a terminal
    each report replaces the last; into a pipe, one line each (a summary,
    or with `as_json` the report as one JSON object), flushed, so `tail`,
    `grep --line-buffered` or a log shipper see each as it comes."""
    out = out or sys.stdout
    tty = out.isatty() and not as_json
    while True:
        started = time.monotonic()
        stamp = datetime.datetime.now().astimezone().isoformat(
            timespec='seconds')
        try:
            report = gather(app, recent if tty else 0)
            error = None if report is not None else _health_error
        except overview.REDIS_ERRORS as exc:
            report, error = None, str(exc)
        if as_json:
            text = json.dumps({'time': stamp, 'report': report,
                               'error': error}, sort_keys=True,
                              default=repr)
        elif tty:
            text = CLEAR + ('every %gs, %s  (Ctrl-C to stop)\n\n' % (
                interval, stamp)) + (render(report) if report is not None
                                    else 'Redis unreachable: %s' % error)
        else:
            text = '%s %s' % (stamp, summary_line(report, error))
        out.write(text + '\n')
        out.flush()
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def summary_line(report, error=None):
    """One line for a pipe: health, then per queue its counts."""
    if report is None:
        return 'health=unknown redis=unreachable (%s)' % error
    health = report['health']
    parts = ['health=%s' % health['status']]
    for name, q in report['queue'].items():
        parts.append('queue=%s pending=%d scheduled=%d running=%d dead=%d '
                     'consumers=%d busy=%d/%d' % (
                         name, q['pending'], q['scheduled'], q['running'],
                         q['dead_letters'], q['consumers'],
                         q['workers'] - q['idle_workers'], q['workers']))
        if q.get('paused'):
            parts[-1] += ' paused=1'
    if health['reasons']:
        parts.append('reasons=%s' % json.dumps(health['reasons']))
    if health.get('warnings'):
        parts.append('warnings=%s' % json.dumps(health['warnings']))
    return ' '.join(parts)


def render(report):
    health = report['health']
    out = ['health: %s' % health['status']]
    out += ['  - %s' % reason for reason in health['reasons']]
    # What does not make the suite unready but an operator should know
    # (an eviction policy allowed, persistence off, memory near maxmemory).
    out += ['  ! %s' % warning for warning in health.get('warnings', ())]
    checks = health['checks'].get('queues', {})
    rows = []
    for name, q in report['queue'].items():
        sched = checks.get(name, {}).get('scheduler', {})
        leader = ('-' if not sched.get('deployed') else
                  (sched.get('leader') or 'yes') if sched.get('leader_present')
                  else 'NONE')
        rows.append([name, 'paused' if q.get('paused') else 'active',
                     q['pending'], q['scheduled'], q['running'],
                     q['results_held'], q['dead_letters'], q['consumers'],
                     '%d/%d' % (q['workers'] - q['idle_workers'],
                                q['workers']), leader])
    out += ['', table(['QUEUE', 'STATE', 'PENDING', 'SCHEDULED', 'RUNNING',
                       'RESULTS', 'DEAD', 'CONSUMERS', 'BUSY', 'SCHEDULER'],
                      rows)]
    events = [(name, e) for name, listed in (report.get('events') or {})
              .items() for e in listed]
    if events:
        rows = [[name, e.get('action', '?'), ago(e.get('at')),
                 '%s (%s)' % (e.get('by', '?'), e.get('via', '?')),
                 e.get('from', '?'), e.get('reason') or '']
                for name, e in events]
        out += ['', 'queue events:',
                table(['QUEUE', 'ACTION', 'WHEN', 'BY', 'FROM', 'REASON'],
                      rows)]
    if report.get('recent'):
        rows = [[t['id'], short(t['name'], 40), t['state'],
                 progress_text(t), ago(t['updated'])]
                for t in report['recent']]
        out += ['', 'recent tasks:',
                table(['ID', 'NAME', 'STATE', 'PROGRESS', 'CHANGED'], rows)]
    return '\n'.join(out)
