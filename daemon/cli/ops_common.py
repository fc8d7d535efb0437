"""What the operator commands (status, task, wait, workers, submit,
dead-letters) share: their options, connecting to Redis, exit codes, and
plain-text tables.  They read through huey_worker.journal and
huey_worker.overview, like the status endpoint, so both always show the same
data."""
import functools
import json
import os
import select
import sys
import time

import click
import click.utils
import redis

from .. import app as app_module
from .. import redisconn
from ..config import ConfigError
from ..exitcodes import EX_UNAVAILABLE
from ..mainloop import refuse_immediate
from .common import config_options, exits_78_on_config_error, load_from

OPS_SECTIONS = ('redis', 'huey', 'tasks', 'delivery', 'journal', 'status')
_REDIS_PACKAGE = os.path.dirname(os.path.abspath(redis.__file__)) + os.sep


def _frames(exc):
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def writing_output(exc):
    """Whether `exc` is an OSError raised writing stdout or stderr (every
    command writes through click.echo, which flushes each time): no news
    about Redis; huey_worker.cli reports it (74) or, for a pipe whose
    reader has gone, ends as killed by SIGPIPE."""
    return isinstance(exc, OSError) and any(
        frame.f_code is click.utils.echo.__code__ for frame in _frames(exc))


def redis_error(exc):
    """Redis's own errors (ConnectionError, TimeoutError...), and an
    OSError only when redis-py itself let it through."""
    if isinstance(exc, redis.exceptions.RedisError):
        return True
    return isinstance(exc, OSError) and not writing_output(exc) and any(
        os.path.abspath(frame.f_code.co_filename).startswith(_REDIS_PACKAGE)
        for frame in _frames(exc))


def exits_69_when_redis_unreachable(fn):
    """Redis errors -> one line and 69.  Also: an operator command that
    fails in immediate mode (the adopted app built with immediate=True, for
    commands that do not go through connect()) is refused as a
    configuration error, since there is no queue to operate on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, click.exceptions.ClickException,
                click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if redis_error(exc):
                redis_unreachable(exc)
            cfg = app_module.current().config
            if cfg is not None and cfg.huey.immediate:
                refuse_immediate_mode(cfg)
            raise
    return wrapper


def command_name(ctx=None):
    """'huey-worker dead-letters list', whatever the program was called."""
    ctx = ctx or click.get_current_context(silent=True)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return ' '.join(['huey-worker'] + names[::-1])


def refuse_immediate_mode(cfg, what=None, doing='report'):
    """ConfigError (78) when [huey] immediate is on (naming where it was
    set): tasks then run in the producer, there is no queue for an
    operator command or the status endpoint to report, as there is none
    for the consumer and scheduler (huey_worker.mainloop.refuse_immediate,
    whose check and source this is)."""
    what = what or '`%s`' % command_name()
    try:
        refuse_immediate(cfg, what)
    except ConfigError as exc:
        raise ConfigError(
            'immediate mode runs tasks in the producer, so there is no queue '
            'for %s to %s (the consumer and scheduler refuse it too); set it '
            'false' % (what, doing), exc.section, exc.key, exc.value,
            origin=exc.origin) from None


def redis_unreachable(error):
    """One line naming the Redis tried (never its password), exit 69."""
    cfg = app_module.current().config
    where = (' at %s' % redisconn.describe(cfg)) if cfg is not None else ''
    # error_text: with the code redis-py strips (READONLY, MASTERDOWN...).
    text = redisconn.error_text(error) if isinstance(error, BaseException) \
        else str(error)
    fail(EX_UNAVAILABLE, 'Redis %s%s (%s)' % (
        redisconn.outage_word(error) if isinstance(error, BaseException)
        else 'unreachable', where,
        ' '.join(text.split()) or type(error).__name__))


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
    doing = 'enqueue into: it would run the task in this command' \
        if with_tasks else 'report'
    # Before the app and task modules load; the adopted app's own
    # immediate=True is known after (nothing has run yet).
    refuse_immediate_mode(cfg, doing=doing)
    if cfg.huey.app:
        from .. import adopt
        app = adopt.adopt(cfg, with_tasks=with_tasks)
    elif with_tasks:
        app = app_module.configure(cfg)
    else:
        app = app_module.huey.configure(cfg)
    refuse_immediate_mode(app.config or cfg, doing=doing)
    # A queue another kind of producer owns (WRONGTYPE) is a config error
    # (78), not an outage (69).
    app.storage.check_queue_key(str(app.config.source('huey.queue')))
    return app


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
