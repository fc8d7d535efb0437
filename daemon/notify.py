"""sd_notify for the daemons (the sdnotify package).  Outside systemd
(no NOTIFY_SOCKET) every call does nothing."""
import os
import time

import sdnotify


class Notifier:
    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get('NOTIFY_SOCKET'))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # A reader that falls behind must never stall the main loop: a
            # full socket drops the message (the next one says the same).
            self._notifier.socket.setblocking(False)
        usec = environ.get('WATCHDOG_USEC')
        pid = environ.get('WATCHDOG_PID')
        self.watchdog_interval = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            # Feed at half the interval, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_status = None
        self._last_watchdog = None

    def send(self, *lines):
        if self._notifier is not None:
            self._notifier.notify('\n'.join(lines))

    def ready(self, status=None):
        self.send('READY=1', *(['STATUS=' + status] if status else []))
        self._last_status = status

    def status(self, text):
        if text != self._last_status:
            self.send('STATUS=' + text)
            self._last_status = text

    def watchdog(self):
        self._last_watchdog = time.monotonic()
        self.send('WATCHDOG=1')

    def watchdog_due(self):
        """Whether half of WatchdogSec passed since the last WATCHDOG=1."""
        return bool(self.watchdog_interval) and (
            self._last_watchdog is None or
            time.monotonic() - self._last_watchdog >= self.watchdog_interval)

    def keep_alive(self):
        """WATCHDOG=1 when due: for waits in which the process is alive by
        construction (a drain with a deadline, a wait for Redis)."""
        if self.watchdog_due():
            self.watchdog()

    def extend_timeout(self, seconds):
        """Let the current start, reload or stop last up to `seconds` from
        now when its systemd timeout (TimeoutStopSec=, ...) is shorter;
        systemd never shortens one.  A drain is then cut by shutdown_timeout,
        which the operator sets, not by the unit."""
        self.send('EXTEND_TIMEOUT_USEC=%d' % int(seconds * 1e6))

    def stopping(self):
        self.send('STOPPING=1')

    def reloading(self):
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send('RELOADING=1', 'MONOTONIC_USEC=%d' % usec)
