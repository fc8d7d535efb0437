"""Logging for the daemons: stderr (journald under systemd) and, when
[logging] file is set, that file.  The file handler notices rotation by
itself (it checks the inode before each line) and can be told to reopen
(SIGUSR1), so logrotate needs no copytruncate and no line is lost.

[logging] format = json writes one JSON object per line on both
(JsonFormatter).  The standard library's json and logging do it: the
format is a dozen lines whose keys this project must keep stable, and a
dependency more would be one more wheel for offline installs."""
import contextlib
import datetime
import json
import logging
import logging.handlers
import os
import re
import sys

from .config import ConfigError

FORMAT = '%(asctime)s %(levelname)s [%(processName)s %(process)d] ' \
         '%(name)s: %(message)s'
STDERR_FORMAT_JOURNAL = '%(levelname)s [%(processName)s] %(name)s: %(message)s'


# The fixed keys of a JSON line, in this order.  Task lines (the logger
# huey_worker.task) add TASK_KEYS; records may add them through `extra`.
JSON_KEYS = ('time', 'level', 'logger', 'process', 'message')
TASK_KEYS = ('task', 'task_id', 'outcome', 'duration', 'attempt')
TASK_LOGGER = 'huey_worker.task'


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC, with
    milliseconds), level, logger, process (name and pid), message (the
    formatted text, as the text format has it), exception (the traceback,
    when there is one); on task lines task, task_id, outcome, duration
    (seconds) and attempt, as far as the line knows them.  Values pass
    through json.dumps: a newline in a message stays inside its string,
    so a line is always exactly one record."""

    def format(self, record):
        out = {
            'time': datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc).isoformat(
                    timespec='milliseconds').replace('+00:00', 'Z'),
            'level': record.levelname,
            'logger': record.name,
            'process': '%s %d' % (record.processName, record.process),
            'message': record.getMessage(),
        }
        if record.name == TASK_LOGGER:
            out.update(task_fields(record, out['message']))
        for key in TASK_KEYS:
            given = getattr(record, key, None)
            if given is not None:
                out[key] = given
        if record.exc_info:
            out['exception'] = self.formatException(record.exc_info)
        elif record.exc_text:
            out['exception'] = record.exc_text
        if record.stack_info:
            out['stack'] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def task_fields(record, message):
    """task, task_id, outcome and duration of a worker's task line, read
    off its text: 'start NAME ID' and 'end NAME ID OUTCOME SECONDSs ...'
    (daemon/worker.py).  The attempt, where the worker passes it, comes in
    `extra`."""
    match = _TASK_LINE.match(message)
    if match is None:
        return {}
    kind, name, task_id, outcome, seconds = match.groups()
    out = {'task': name, 'task_id': task_id}
    if kind == 'start':
        out['outcome'] = 'started'
    elif outcome is not None:
        out['outcome'] = outcome
        out['duration'] = float(seconds)
    return out


_TASK_LINE = re.compile(r'(start|end) (\S+) (\S+)(?: (\S+) ([0-9.]+)s\b)?')


def formatter(cfg, fmt=FORMAT):
    """The formatter [logging] format asks for; `fmt` for the text one."""
    if getattr(cfg.logging, 'format', 'text') == 'json':
        return JsonFormatter()
    return logging.Formatter(fmt)


class ReopenableFileHandler(logging.handlers.WatchedFileHandler):
    def reopen(self):
        with self.lock:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
            self._statstream()


def setup(cfg, stderr=None):
    """(Re)configure logging from a Config; returns the root logger used."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    level = getattr(logging, cfg.logging.level.upper())
    root.setLevel(level)
    stream = logging.StreamHandler(stderr or sys.stderr)
    # journald stamps each line itself; a terminal wants the time.
    fmt = STDERR_FORMAT_JOURNAL if os.environ.get('JOURNAL_STREAM') else FORMAT
    stream.setFormatter(formatter(cfg, fmt))
    root.addHandler(stream)
    if cfg.logging.file:
        handler = ReopenableFileHandler(cfg.logging.file, encoding='utf-8')
        handler.setFormatter(formatter(cfg))
        root.addHandler(handler)
    # Huey logs two lines of its own per task at INFO; ours replace them.
    logging.getLogger('huey').setLevel(max(level, logging.WARNING))
    return root


def reopen():
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


def config_error_to_file(exc, path=None):
    """Also write the ConfigError that stops a daemon at start to its log
    file: stderr carries it to the journal (or Supervisor's log), but
    operators read /var/log/huey-worker*.log.  Through the file handler
    logging has, else to `path` (the [logging] file as far as it could be
    read), opened for this one line; nowhere when neither exists or the
    file cannot be opened."""
    record = logging.LogRecord('huey_worker', logging.ERROR, __file__, 0,
                               'config error, exiting with status 78: %s',
                               (exc,), None)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, ReopenableFileHandler)]
    if handlers or not path:
        for handler in handlers:
            handler.handle(record)
        return
    try:
        handler = ReopenableFileHandler(path, encoding='utf-8')
    except OSError:
        return
    try:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.handle(record)
    finally:
        handler.close()


@contextlib.contextmanager
def config_errors_to_file():
    """Around what a daemon does at start after logging is set up (its
    checks, binding its socket): a ConfigError goes to the log file too."""
    try:
        yield
    except ConfigError as exc:
        config_error_to_file(exc)
        raise
