"""Finding any task still in retention: by state, task name and time
window, newest first, a page at a time (GET /tasks, `huey-worker find`,
and the selections of retry).  Reads the journal's state and name indexes
(journal.reads.find_tasks), which its writers keep with every change."""
from .. import overview
from ..journal import reads
from ..journal.layout import STATES
from .base import ActionError, parse_time

WINDOW_FIELDS = reads.WINDOW_FIELDS


def find(app, queue=None, state=None, name=None, since=None, until=None,
         field='updated', limit=50, cursor=None):
    """{'queue', 'tasks': [shaped records], 'count', 'next_cursor'} for
    one page.  `since`/`until`: epoch seconds or what parse_time reads.
    ActionError (400, exit 65) for a bad filter, (404, exit 66) for an
    unknown queue."""
    storage = overview.storage_for(app, queue)
    if storage is None:
        raise ActionError('unknown queue %r' % queue, 404, 66)
    if state is not None and state not in STATES:
        raise ActionError('unknown state %r (one of %s)' % (
            state, ', '.join(STATES)))
    if field not in WINDOW_FIELDS:
        raise ActionError('unknown time field %r (one of %s)' % (
            field, ', '.join(WINDOW_FIELDS)))
    try:
        since = None if since is None else parse_time(since)
        until = None if until is None else parse_time(until)
    except ValueError as exc:
        raise ActionError(str(exc))
    if not isinstance(limit, int) or isinstance(limit, bool) or \
            not 1 <= limit <= 1000:
        raise ActionError('limit must be a whole number from 1 to 1000')
    try:
        tasks, next_cursor = reads.find_tasks(
            app, storage, state=state, name=name, since=since, until=until,
            field=field, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ActionError(str(exc))
    return {'queue': storage.name, 'tasks': tasks, 'count': len(tasks),
            'next_cursor': next_cursor}
