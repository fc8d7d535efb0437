"""`huey-worker find`: list tasks by state, task name and time window,
newest first, a page at a time (daemon/actions/find.py; GET /tasks)."""
import click

from .. import actions, overview
from ..journal.layout import STATES
from ..journal.reads import WINDOW_FIELDS
from .actions_common import action_errors
from .ops_common import ago, connect, ops_command, print_json, short, table


@click.command('find')
@click.option('--state', type=click.Choice(STATES))
@click.option('--name', metavar='TASK', help='Task name as registered '
              '(module.function) or as `submit` takes it.')
@click.option('--since', metavar='TIME', help='Epoch seconds, ISO 8601, or '
              'a duration ago (2h, 30m, 7d).')
@click.option('--until', metavar='TIME')
@click.option('--field', type=click.Choice(WINDOW_FIELDS), default='updated',
              show_default=True, help='The time --since and --until bound.')
@click.option('--limit', default=50, show_default=True,
              type=click.IntRange(1, 1000))
@click.option('--cursor', help='Go on from where the page before ended (it '
              'prints the cursor).')
@ops_command
@action_errors
def command(state, name, since, until, field, limit, cursor, as_json,
            **params):
    """List tasks still in retention (the journal's records) by state,
    task name and time window, newest first (as GET /tasks).  A page
    holds up to --limit tasks; `next: CURSOR` at its end means more may
    follow.  Exit 65 for a bad filter value."""
    app = connect(params, with_tasks=bool(name))
    if name:
        try:
            name = actions.resolve_name(app, overview.storage_for(app), name)
        except actions.ActionError:
            pass   # a name the journal does not know lists nothing
    page = actions.find(app, state=state, name=name, since=since,
                        until=until, field=field, limit=limit, cursor=cursor)
    if as_json:
        print_json(page)
        return
    rows = [[t['id'], short(t['name'], 40), t['state'],
             ago(t['enqueued']), ago(t['finished']), ago(t['updated'])]
            for t in page['tasks']]
    if rows:
        click.echo(table(['ID', 'NAME', 'STATE', 'ENQUEUED', 'FINISHED',
                          'CHANGED'], rows))
    else:
        click.echo('no task found')
    if page['next_cursor']:
        click.echo('next: %s' % page['next_cursor'])
