"""`huey-worker tasks`: the registered task names with their retry and
time-limit settings (as GET /task-names)."""
import click

from .. import tasknames
from .ops_common import connect, ops_command, print_json, table


def task_table(app):
    """{'tasks': [{name, retries, retry_delay, retry_backoff, timeout,
    timeout_from, priority, expires}], 'default_timeout': seconds or
    None}, sorted by name.  `timeout` is the limit a worker applies:
    the task's own, else [tasks] timeout (timeout_from says which; None
    and 'none' when neither sets one).  Seconds throughout; expires as
    the task declares it (seconds or a datetime's text)."""
    cfg = app.config
    default = cfg.tasks.timeout if cfg is not None else 0
    out = []
    for name, task_class in sorted(tasknames.registered(app).items()):
        own = getattr(task_class, 'default_timeout', None)
        timeout, source = (own, 'task') if own is not None else (
            (default, '[tasks] timeout') if default else (None, 'none'))
        expires = getattr(task_class, 'default_expires', None)
        retry = {key: getattr(task_class, 'default_' + key, None)
                 for key in ('retries', 'retry_delay', 'retry_backoff')}
        if _builtin(task_class) and cfg is not None:
            # Their message takes [tasks] retries, retry_delay and
            # retry_backoff at enqueue (tasks/runtime.py BuiltinTask).
            retry = {key: getattr(cfg.tasks, key) for key in retry}
        out.append({
            'name': name,
            'retries': retry['retries'] or 0,
            'retry_delay': retry['retry_delay'] or 0,
            'retry_backoff': retry['retry_backoff'],
            'timeout': timeout, 'timeout_from': source,
            'priority': getattr(task_class, 'default_priority', None),
            'expires': expires if expires is None or isinstance(
                expires, (int, float)) else str(expires)})
    return {'tasks': out, 'default_timeout': default or None}


def _builtin(task_class):
    try:
        from ..tasks.runtime import BuiltinTask
    except ImportError:   # the built-in tasks' own dependencies missing
        return False
    return issubclass(task_class, BuiltinTask)


@click.command('tasks')
@ops_command
def command(as_json, **params):
    """List the registered task names ([tasks] modules, the built-in tasks,
    an adopted app's) with their retries, retry delay, time limit,
    priority and expiry (as GET /task-names).  Reads no Redis."""
    app = connect(params, with_tasks=True)
    report = task_table(app)
    if as_json:
        print_json(report)
        return
    click.echo(render(report))


def render(report):
    if not report['tasks']:
        return 'no task registered (set [tasks] modules)'
    rows = [[t['name'], t['retries'], _seconds(t['retry_delay']),
             t['retry_backoff'] if t['retry_backoff'] not in (None, 0, 1)
             else None,
             _seconds(t['timeout']) + (' (default)' if t['timeout_from'] ==
                                       '[tasks] timeout' else '')
             if t['timeout'] is not None else 'none',
             t['priority'], t['expires']]
            for t in report['tasks']]
    return table(['NAME', 'RETRIES', 'RETRY DELAY', 'BACKOFF', 'TIMEOUT',
                  'PRIORITY', 'EXPIRES'], rows)


def _seconds(value):
    if value is None:
        return None
    return '%gs' % value
