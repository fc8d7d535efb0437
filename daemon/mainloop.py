"""The shape every long-running daemon shares (as in Huey's consumer):
initialize, then loop until told to stop, then shutdown.  Signal handlers
only set flags (daemon/signals.py); this loop acts on them between passes."""
import logging
import time

from . import logs
from .config import ConfigError
from .exitcodes import EX_OK
from .signals import handled_signals

log = logging.getLogger('huey_worker.daemon')


class MainLoop:
    tick = 0.5   # seconds between passes, unless next_wait() says otherwise

    def run(self):
        with handled_signals() as flags:
            self.flags = flags
            if not self.initialize():
                return EX_OK       # told to stop before it could start
            while not flags.stop_requests:
                if flags.reload:
                    flags.reload = False
                    self.reload()
                if flags.reopen:
                    flags.reopen = False
                    self.reopen_logs()
                self.loop()
                flags.wait(self.next_wait())
            self.shutdown()
        return EX_OK

    def initialize(self):
        """Return False when stopped before being ready."""
        return True

    def loop(self):
        raise NotImplementedError

    def shutdown(self):
        pass

    def reload(self):
        pass

    def next_wait(self):
        return self.tick

    def reopen_logs(self):
        logs.reopen()
        log.info('SIGUSR1: log files reopened')

    def pause(self, seconds):
        """flags.wait for waits outside the loop's passes (Redis unreachable
        at start, also right after a reload's re-execution, when systemd's
        watchdog runs): the watchdog keeps being fed, since this process is
        alive and the wait ends by itself.  Returns early on a stop signal."""
        deadline = time.monotonic() + seconds
        while not self.flags.stop_requests:
            self.notifier.keep_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.flags.wait(min(left, self.notifier.watchdog_interval or left))


def reread_config(reload_config, current, check=None):
    """SIGHUP's first step in every daemon: read the configuration again
    (and run `check(new)` for daemon-specific validation).  Returns the new
    Config, or None when it is invalid: the error is logged and the daemon
    goes on with `current`."""
    log.info('SIGHUP: re-reading the configuration')
    try:
        new = reload_config() if reload_config else current
        if check is not None:
            check(new)
    except ConfigError as exc:
        log.error('configuration not reloaded, keeping the current one: %s',
                  exc)
        return None
    for warning in new.warnings:
        log.warning('%s', warning)
    return new


def refuse_immediate(cfg, daemon):
    """Raise ConfigError when [huey] immediate is on: tasks then run in the
    producer, and the `daemon` ('consumer', 'scheduler') has nothing to
    do."""
    if cfg.huey.immediate:
        raise ConfigError('immediate mode runs tasks in the producer; the %s '
                          'has nothing to do (set it false)' % daemon,
                          'huey', 'immediate', 'true',
                          origin=str(cfg.source('huey.immediate')))
