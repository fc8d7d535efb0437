"""`huey-worker purge-results`: remove finished tasks' records and results
by age, instead of FLUSHDB (daemon/journal/purge.py)."""
import time

import click

from ..journal import TERMINAL
from ..journal.purge import BATCH, Purge, parse_duration
from .ops_common import connect, ops_command, print_json, when

ORDER = ('complete', 'failed', 'revoked', 'expired', 'canceled')


def _duration(ctx, param, value):
    try:
        return value, parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc))


def _states(ctx, param, values):
    chosen = []
    for value in values:
        for word in value.split(','):
            word = word.strip().lower()
            if word not in TERMINAL:
                raise click.BadParameter(
                    '%r is not an end state (one of %s; a task that has not '
                    'ended is never removed)' % (word, ', '.join(ORDER)))
            if word not in chosen:
                chosen.append(word)
    return tuple(chosen) or ORDER


@click.command('purge-results')
@click.option('--older-than', 'older_than', required=True, metavar='DURATION',
              callback=_duration,
              help='Remove tasks that ended more than this long ago: 7d, '
                   '12h, 30m, 3600 (seconds), 1d12h.')
@click.option('--state', 'states', multiple=True, callback=_states,
              metavar='STATE[,STATE]',
              help='Only tasks that ended so (complete, failed, revoked, '
                   'expired, canceled; repeat or comma-separate).  Default: '
                   'all of them, and index entries whose record expired.')
@click.option('--dry-run', is_flag=True,
              help='Count what would be removed; remove nothing.')
@click.option('--batch', default=BATCH, show_default=True,
              type=click.IntRange(1, 5000),
              help='Task ids checked and removed per round trip.')
@ops_command
def command(older_than, states, dry_run, batch, as_json, **params):
    """Remove the journal records, histories and results of tasks that
    ended (complete, failed, revoked, expired, canceled) more than
    --older-than ago, in batches, while consumers run.  Never touches the
    queue, the schedule, in-flight tasks, dead letters or a task that has
    not ended.  Exit 0 (also when nothing was old enough), 64 bad
    duration or state, 69 Redis unreachable.  The queue: [huey] queue
    (--queue)."""
    text, seconds = older_than
    app = connect(params)
    storage = app.storage
    cutoff = time.time() - seconds
    report = Purge(storage, cutoff, states, dry_run=dry_run,
                   index_max=app.config.journal.index_max,
                   batch=batch).run()
    removed = report['removed']
    if as_json:
        print_json({'queue': storage.name, 'older_than': text,
                    'cutoff': cutoff, 'states': list(states),
                    'dry_run': dry_run,
                    'removed': {s: n for s, n in removed.items() if s},
                    'without_record': removed.get('', 0),
                    'kept': report['kept'], 'scanned': report['scanned']})
        return
    tasks = sum(n for s, n in removed.items() if s)
    by_state = ', '.join('%s %d' % (s, removed[s]) for s in ORDER
                         if removed.get(s))
    click.echo('queue %s: %s %d finished task(s) that ended before %s '
               '(older than %s)%s' % (
                   storage.name, 'would remove' if dry_run else 'removed',
                   tasks, when(cutoff), text,
                   ': %s' % by_state if by_state else ''))
    if removed.get(''):
        click.echo('%s %d index entr%s whose record had expired (with any '
                   'result left)' % ('would remove' if dry_run else 'removed',
                                     removed[''], 'y' if removed[''] == 1
                                     else 'ies'))
    if report['kept']:
        click.echo('left %d older task(s) in place: not ended, or in a state '
                   'not chosen' % report['kept'])
