"""Logging for the daemons: stderr (journald under systemd) and, when
[logging] file is set, that file.  The file handler notices rotation by
itself (it checks the inode before each line) and can be told to reopen
(SIGUSR1), so logrotate needs no copytruncate and no line is lost."""
import logging
import logging.handlers
import os
import sys

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
