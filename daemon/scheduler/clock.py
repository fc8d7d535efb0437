"""The clocks the scheduler reads.

Wall time (which minute it is, which delayed tasks are due) comes through
a clock function so tests can drive it; leases are timed with the boot
clock, which never jumps with NTP or a hand-set date and keeps counting
while the process is stopped (SIGSTOP) or the VM is suspended.

TEST ONLY: HUEY_TEST_CLOCK_FILE names a file holding either a fixed time
in unix seconds (`1893499200`) or an offset from the real clock (`+30`,
`-12.5`).  It is re-read on every call, so a test moves time by rewriting
it (atomically: write a temporary file, then rename).  Never set it in
production; the scheduler logs a warning when it is set.
"""
import os
import time

from ..config import ConfigError

TEST_CLOCK_ENV = 'HUEY_TEST_CLOCK_FILE'


def system_clock():
    return time.time()


def boot_clock():
    """Seconds on a clock that only moves forward, suspend included."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def _parse(text):
    text = text.strip()
    if text[:1] in '+-':
        return 'offset', float(text)
    return 'fixed', float(text)


class FileClock:
    """Wall time as a test file says (see the module docstring)."""

    def __init__(self, path):
        self.path = path
        try:
            self._reading = self._read()
        except (OSError, ValueError) as exc:
            raise ConfigError('test clock file %s: %s' % (path, exc),
                              origin='environment %s' % TEST_CLOCK_ENV)

    def _read(self):
        with open(self.path, encoding='ascii') as fh:
            return _parse(fh.read())

    def __call__(self):
        try:
            self._reading = self._read()
        except (OSError, ValueError):
            pass  # keep the last good reading
        kind, number = self._reading
        return number if kind == 'fixed' else time.time() + number

    def __repr__(self):
        return 'FileClock(%r)' % self.path


def from_environment(environ=None):
    """The wall clock to use: the test clock file when one is named."""
    environ = os.environ if environ is None else environ
    path = environ.get(TEST_CLOCK_ENV)
    return FileClock(path) if path else system_clock
