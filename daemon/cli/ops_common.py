"""What the operator commands (status, task, wait, workers, submit,
dead-letters) share: their options, connecting to Redis, exit codes, and
plain-text tables.  They read through huey_worker.journal and
huey_worker.overview, like the status endpoint, so both always show the same
data."""
import functools
import json
import select
import sys
import time

import click
import redis

from .. import app as app_module
from .. import redisconn
from ..exitcodes import EX_UNAVAILABLE
from .common import config_options, exits_78_on_config_error, load_from

OPS_SECTIONS = ('redis', 'huey', 'tasks', 'delivery', 'journal', 'status')
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


def exits_69_when_redis_unreachable(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except REDIS_ERRORS as exc:
            # A write into a closed stdout is an OSError too; it is no
            # news about Redis (huey_worker.cli ends the process quietly).
            if isinstance(exc, BrokenPipeError) and output_closed():
                raise
            redis_unreachable(exc)
    return wrapper


def redis_unreachable(error):
    """One line naming the Redis tried (never its password), exit 69."""
    cfg = app_module.current().config
    where = (' at %s' % redisconn.describe(cfg)) if cfg is not None else ''
    fail(EX_UNAVAILABLE, 'Redis unreachable%s (%s)' % (
        where, ' '.join(str(error).split()) or type(error).__name__))


def output_closed():
    """Whether stdout or stderr leads into a pipe or socket whose reader
    has gone (poll reports an error on its writing end)."""
    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP)
               for _, events in poller.poll(0))


def ops_command(fn):
    """--config/--set/registry flags, --json, config errors -> 78, Redis
    unreachable -> 69."""
    wrapper = exits_69_when_redis_unreachable(fn)
    wrapper = exits_78_on_config_error(wrapper)
    wrapper = click.option('--json', 'as_json', is_flag=True,
                           help='Machine-readable JSON output.')(wrapper)
    return config_options(*OPS_SECTIONS)(wrapper)


def connect(params, with_tasks=False):
    """The configured app (task modules imported when asked): the shared
    one, or the user's own that [huey] app names."""
    cfg = load_from(params)
    for warning in cfg.warnings:
        click.echo('huey-worker: warning: %s' % warning, err=True)
    if cfg.huey.app:
        from .. import adopt
        return adopt.adopt(cfg, with_tasks=with_tasks)
    if with_tasks:
        return app_module.configure(cfg)
    return app_module.huey.configure(cfg)


def fail(code, message):
    click.echo('huey-worker: %s' % message, err=True)
    sys.exit(code)


def print_json(value):
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=repr))


# --- text formatting -----------------------------------------------------------

def when(epoch):
    if epoch is None:
        return '-'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))


def ago(epoch, now=None):
    if epoch is None:
        return '-'
    seconds = (time.time() if now is None else now) - epoch
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = '%ds' % seconds
    elif seconds < 3600:
        text = '%dm%02ds' % divmod(int(seconds), 60)
    elif seconds < 86400:
        text = '%dh%02dm' % divmod(int(seconds) // 60, 60)
    else:
        text = '%dd%02dh' % divmod(int(seconds) // 3600, 24)
    return ('in ' + text) if future else (text + ' ago')


def table(headers, rows):
    """Left-aligned columns, as plain text lines."""
    rows = [[('-' if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    fmt = '  '.join('%%-%ds' % w for w in widths)
    lines = [(fmt % tuple(headers)).rstrip()]
    lines += [(fmt % tuple(row)).rstrip() for row in rows]
    return '\n'.join(lines)


def progress_text(record):
    p = record.get('progress')
    if not p:
        return '-'
    text = str(p['current'])
    if p.get('total') is not None:
        text += '/%s' % p['total']
    if p.get('percent') is not None:
        text += ' (%g%%)' % p['percent']
    return text


def short(text, width=60):
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= width else text[:width - 3] + '...'
