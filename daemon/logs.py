"""Logging for the daemons: stderr (journald under systemd) and, when
[logging] file is set, that file.  The file handler notices rotation by
itself (it checks the inode before each line) and can be told to reopen
(SIGUSR1), so logrotate needs no copytruncate and no line is lost."""
import contextlib
import logging
import logging.handlers
import os
import sys

from .config import ConfigError

FORMAT = '%(asctime)s %(levelname)s [%(processName)s %(process)d] ' \
         '%(name)s: %(message)s'
STDERR_FORMAT_JOURNAL = '%(levelname)s [%(processName)s] %(name)s: %(message)s'


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
    stream.setFormatter(logging.Formatter(fmt))
    root.addHandler(stream)
    if cfg.logging.file:
        handler = ReopenableFileHandler(cfg.logging.file, encoding='utf-8')
        handler.setFormatter(logging.Formatter(FORMAT))
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
